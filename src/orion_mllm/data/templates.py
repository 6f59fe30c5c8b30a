"""Prompt templates that turn a caption into a text-to-image request (paper appendix A.2).

Three interaction styles, so a model is not fitted to one command structure: polite requests,
direct commands and questions; and a fourth, the bare caption ("a picture of ..."), the form
text-to-image data and benchmarks use. ``{caption}`` is a noun phrase such as "a red circle above a blue
square". Used for ShapesWorld and for turning any caption list into generation conversations.
"""

from __future__ import annotations

import random

POLITE = (
    "I'd like to see a drawing of {caption}.",
    "Please draw {caption}.",
    "Could you please make a picture of {caption}?",
    "I would love an image of {caption}, please.",
    "Please generate an image showing {caption}.",
    "Kindly render {caption}.",
    "If you could, create a picture of {caption}.",
    "I'd appreciate an illustration of {caption}.",
    "Please produce a simple image of {caption}.",
    "Would you mind drawing {caption}?",
    "It would be great to see {caption}.",
    "Please sketch {caption} for me.",
)
COMMAND = (
    "Generate an image of {caption}.",
    "Draw {caption}.",
    "Create a picture of {caption}.",
    "Render {caption}.",
    "Make an image with {caption}.",
    "Paint {caption}.",
    "Produce a picture showing {caption}.",
    "Show me {caption}.",
    "Illustrate {caption}.",
    "Sketch {caption}.",
    "Depict {caption}.",
    "Output an image of {caption}.",
)
QUESTION = (
    "Can you produce a picture of {caption}?",
    "Could you draw {caption}?",
    "Can you generate an image of {caption}?",
    "Would you create a picture of {caption}?",
    "Can you show me {caption}?",
    "How would {caption} look?",
    "Could you render {caption}?",
    "Can you make an image with {caption}?",
    "Will you paint {caption}?",
    "Could you illustrate {caption}?",
    "Can you sketch {caption}?",
    "What does {caption} look like?",
)
# The bare caption, as text-to-image datasets and benchmarks give it (GenEval: "a photo of ..."). Without
# this style the tiny model drew GenEval's prompts far worse than the same captions in a request
# (shapes-gen 0.33 vs 0.54, benchmarks/prompt_format.py). GenEval's own "a photo of" wording is left
# out on purpose, so the evaluation still asks in words the model never trained on.
CAPTION = (
    "{caption}",
    "{caption}.",
    "a picture of {caption}",
    "an image of {caption}",
    "a drawing of {caption}",
    "an illustration of {caption}",
)
STYLES = {"polite": POLITE, "command": COMMAND, "question": QUESTION, "caption": CAPTION}
ALL_TEMPLATES: tuple[str, ...] = POLITE + COMMAND + QUESTION + CAPTION


def generation_prompt(caption: str, rng: random.Random) -> str:
    """A random template (uniform over all styles) filled with ``caption``."""
    caption = caption.strip().rstrip(".")
    if not caption:
        raise ValueError("empty caption")
    return rng.choice(ALL_TEMPLATES).format(caption=caption[0].lower() + caption[1:])
