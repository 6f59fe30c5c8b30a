"""Prompt templates that turn a caption into a text-to-image request (paper appendix A.2).

Three interaction styles, so a model is not fitted to one command structure: polite requests,
direct commands and questions. ``{caption}`` is a noun phrase such as "a red circle above a blue
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
STYLES = {"polite": POLITE, "command": COMMAND, "question": QUESTION}
ALL_TEMPLATES: tuple[str, ...] = POLITE + COMMAND + QUESTION


def generation_prompt(caption: str, rng: random.Random) -> str:
    """A random template (uniform over all styles) filled with ``caption``."""
    caption = caption.strip().rstrip(".")
    if not caption:
        raise ValueError("empty caption")
    return rng.choice(ALL_TEMPLATES).format(caption=caption[0].lower() + caption[1:])
