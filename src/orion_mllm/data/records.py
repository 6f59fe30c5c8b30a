"""Record formats -> conversations: the shapes training and evaluation records come in, parsed into
``orion_mllm.sequence.Message`` lists that ``SequenceBuilder.encode`` turns into model inputs.

Accepted record shapes: a list of ``{"role", "content"}`` messages (content a string or a list of
``{"type": "text"|"image"}`` parts), ``{"messages": [...], "images": [...]}`` (ms-swift) and
``{"conversations": [{"from", "value"}], "image"|"images": ...}`` (LLaVA). In string content,
``<image>`` marks where the next image of the record's image list goes. A record that does not
parse raises ``ConversationError`` naming the record and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orion_mllm.images import ImageLike
from orion_mllm.sequence import (
    MISSING_IMAGE,
    ConversationError,
    EncodedConversation,
    ImagePart,
    Message,
    SequenceBuilder,
    TextPart,
)

__all__ = ["IMAGE_PLACEHOLDER", "ROLE_ALIASES", "encode_record", "parse_conversation"]

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def _parts_from_string(text: str, images: list[ImageLike], cursor: list[int]) -> list[TextPart | ImagePart]:
    """Split ``<image>`` placeholders out of a string, taking images from the record's list in order."""
    parts: list[TextPart | ImagePart] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if piece:
            parts.append(TextPart(piece))
        if i < len(pieces) - 1:
            index = cursor[0]
            cursor[0] += 1
            parts.append(ImagePart(images[index]) if index < len(images) else ImagePart(MISSING_IMAGE))
    return parts


def _parts_from_list(content: list[Any], where: str) -> list[TextPart | ImagePart]:
    parts: list[TextPart | ImagePart] = []
    for j, item in enumerate(content):
        if not isinstance(item, dict):
            raise ConversationError(f"{where}: content[{j}] must be a dict, got {type(item).__name__}")
        kind = item.get("type")
        if kind == "text" or (kind is None and "text" in item):
            parts.append(TextPart(str(item.get("text", ""))))
        elif kind == "image" or (kind is None and "image" in item):
            if item.get("image") is None:
                raise ConversationError(f"{where}: content[{j}] is an image part without an 'image' value")
            parts.append(ImagePart(item["image"]))
        else:
            raise ConversationError(
                f"{where}: content[{j}] has unsupported type {kind!r} (use 'text' or 'image')"
            )
    return parts


def _turn_list(value: Any, field_name: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise ConversationError(f"{where}: '{field_name}' must be a list, got {type(value).__name__}")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ConversationError(f"{where}: {field_name}[{i}] must be a dict, got {type(turn).__name__}")
    return value


def parse_conversation(record: Any, record_id: str = "") -> list[Message]:
    """Normalise any accepted record shape into ``Message`` objects, checking roles and images."""
    where = f"record {record_id}" if record_id else "conversation"
    images: list[ImageLike] = []
    if isinstance(record, dict):
        if "conversations" in record:
            turns = _turn_list(record["conversations"], "conversations", where)
            raw = [{"role": m.get("from"), "content": m.get("value")} for m in turns]
        elif "messages" in record:
            raw = _turn_list(record["messages"], "messages", where)
        else:
            raise ConversationError(f"{where}: expected a 'messages' or 'conversations' field")
        found = record.get("images", record.get("image")) or []  # null columns in mixed JSONL
        images = (
            [found] if isinstance(found, (str, bytes)) or not isinstance(found, Sequence) else list(found)
        )
    elif isinstance(record, Sequence):
        raw = list(record)
    else:
        raise ConversationError(
            f"{where}: expected a list of messages or a dict, got {type(record).__name__}"
        )
    if not raw:
        raise ConversationError(f"{where}: no messages")

    cursor = [0]
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise ConversationError(f"{where}: message {i} must be a dict, got {type(msg).__name__}")
        role = ROLE_ALIASES.get(str(msg.get("role")))
        if role is None:
            raise ConversationError(
                f"{where}: message {i} has unknown role {msg.get('role')!r}; "
                f"expected one of {sorted(ROLE_ALIASES)}"
            )
        content = msg.get("content")
        if isinstance(content, str):
            parts = _parts_from_string(content, images, cursor)
        elif isinstance(content, list):
            parts = _parts_from_list(content, f"{where}, message {i}")
        else:
            raise ConversationError(f"{where}: message {i} content must be a string or a list of parts")
        if role == "system" and any(isinstance(p, ImagePart) for p in parts):
            raise ConversationError(f"{where}: message {i}: images are not allowed in system turns")
        if role == "system" and i != 0:
            raise ConversationError(f"{where}: message {i}: a system turn may only come first")
        messages.append(Message(role, tuple(parts)))

    placeholders = cursor[0]
    if placeholders != len(images):
        raise ConversationError(
            f"{where}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {len(images)} image(s) given"
        )
    return messages


def encode_record(
    builder: SequenceBuilder,
    record: Any,
    record_id: str = "",
    *,
    add_generation_prompt: bool = False,
    regress_images: bool = True,
) -> EncodedConversation:
    """Parse a record of any accepted shape and encode it (``builder.encode`` takes parsed messages;
    ``regress_images``: see it)."""
    messages = parse_conversation(record, record_id)
    return builder.encode(
        messages, record_id, add_generation_prompt=add_generation_prompt, regress_images=regress_images
    )
