"""Caption dropout for token-space classifier-free guidance (``train.prompt_dropout``).

A generation or editing record whose request text is dropped teaches the model the *unconditional*
next visual token: what to draw when nothing is asked (for an edit, with the source image still
shown). At inference the engine runs that unconditional branch beside the real request and feeds
``v_u + w (v_c - v_u)`` to both (``inference/engine.py``). The unconditional prompt the pipeline
builds (``OrionPipeline.image_prompts``) is exactly what ``drop_prompt`` makes of a training record:
the user turn before the generated image keeps its images and loses its text (an empty text part
when it had no image), so the two encode to the same tokens (tested).
"""

from __future__ import annotations

import random
from typing import Any

from orion_mllm.data.records import parse_conversation
from orion_mllm.sequence import ImagePart, Message, TextPart


def _message_dict(message: Message) -> dict[str, Any]:
    content = [
        {"type": "image", "image": p.image} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
        for p in message.parts
    ]
    return {"role": message.role, "content": content}


def drop_prompt(record: Any, record_id: str = "") -> list[dict[str, Any]] | None:
    """The record as messages with the request before each generated image dropped (images kept),
    or None when it generates no image (nothing to drop: understanding data is never changed)."""
    messages = parse_conversation(record, record_id)
    out, changed = [], False
    for k, msg in enumerate(messages):
        nxt = messages[k + 1] if k + 1 < len(messages) else None
        generates = (
            nxt is not None and nxt.role == "assistant" and any(isinstance(p, ImagePart) for p in nxt.parts)
        )
        if msg.role == "user" and generates:
            images = tuple(p for p in msg.parts if isinstance(p, ImagePart))
            msg = Message("user", images or (TextPart(""),))
            changed = True
        out.append(_message_dict(msg))
    return out if changed else None


def dropout_rng(seed: int, slot: int) -> random.Random:
    """The coin for the sample at global mixture position ``slot``: a pure function of (seed, slot), so a
    resumed run and any number of processes drop exactly the same samples."""
    return random.Random(f"prompt-dropout/{seed}/{slot}")
