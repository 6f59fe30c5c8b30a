"""Chat sessions: interleaved multi-turn text and images, saved as JSON + safetensors.

A session is a list of turns. A user image is kept as its pixels (encoded by the vision tower each
time the prompt is built); an image the model generated is kept as the visual tokens it predicted,
which go back into the context as they are (never re-encoded from the rendered pixels), plus the
path of its rendering when one was written.

On disk: ``NAME.json`` (turns, with each image's kind and key) and ``NAME.safetensors`` (user
images as uint8 ``[H, W, 3]`` arrays, generated images as ``[N, d]`` float32 tokens). Both are
written to temporary files and renamed, so a failed save never clobbers an earlier one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

SESSION_FORMAT = "orion-chat-session/1"


@dataclass
class UserImage:
    image: Image.Image  # RGB
    source: str = ""  # where it came from (a path), for display


@dataclass
class GeneratedImage:
    tokens: torch.Tensor  # [N, d] the visual tokens the model predicted
    path: str = ""  # its rendering, when one was written


Part = str | UserImage | GeneratedImage


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    parts: list[Part] = field(default_factory=list)


@dataclass
class ChatSession:
    turns: list[Turn] = field(default_factory=list)
    system_prompt: str | None = None

    def add(self, role: str, parts: list[Part]) -> Turn:
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown role {role!r}: expected 'user' or 'assistant'")
        turn = Turn(role, list(parts))
        self.turns.append(turn)
        return turn

    def reset(self) -> None:
        self.turns.clear()

    def to_messages(
        self, placeholder: Image.Image, image_separator: str = ""
    ) -> tuple[list[dict[str, Any]], list[torch.Tensor | None]]:
        """Messages for ``SequenceBuilder.encode`` (generated images stand in as ``placeholder`` pixels,
        for the layout only) and, per image in order, its generated tokens or None (encode the pixels).
        ``image_separator`` starts a user's text that follows an image of the same turn (LLaVA-style
        training data, ShapesWorld included, writes ``<image>\n`` + text)."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        known: list[torch.Tensor | None] = []
        for turn in self.turns:
            content: list[dict[str, Any]] = []
            for k, part in enumerate(turn.parts):
                if isinstance(part, str):
                    after_image = k > 0 and isinstance(turn.parts[k - 1], UserImage)
                    content.append({"type": "text", "text": image_separator + part if after_image else part})
                elif isinstance(part, UserImage):
                    content.append({"type": "image", "image": part.image})
                    known.append(None)
                else:
                    content.append({"type": "image", "image": placeholder})
                    known.append(part.tokens)
            messages.append({"role": turn.role, "content": content})
        return messages, known

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.json) and its ``.safetensors`` sibling; returns the JSON path."""
        path = Path(path).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        turns = []
        for t, turn in enumerate(self.turns):
            parts: list[dict[str, Any]] = []
            for k, part in enumerate(turn.parts):
                key = f"t{t}_p{k}"
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif isinstance(part, UserImage):
                    tensors[key] = torch.from_numpy(
                        np.asarray(part.image.convert("RGB"), dtype=np.uint8).copy()
                    )
                    parts.append({"type": "user_image", "key": key, "source": part.source})
                else:
                    tensors[key] = part.tokens.detach().float().cpu().contiguous()
                    parts.append({"type": "generated_image", "key": key, "path": part.path})
            turns.append({"role": turn.role, "parts": parts})
        doc = {"format": SESSION_FORMAT, "system_prompt": self.system_prompt, "turns": turns}
        weights = path.with_suffix(".safetensors")
        tmp_w, tmp_j = weights.with_name(weights.name + ".tmp"), path.with_name(path.name + ".tmp")
        save_file(tensors, tmp_w)  # an empty dict is a valid file too
        tmp_j.write_text(json.dumps(doc, indent=2) + "\n")
        tmp_w.replace(weights)
        tmp_j.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ChatSession:
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_suffix(".json")
        weights = path.with_suffix(".safetensors")
        for f in (path, weights):
            if not f.is_file():
                raise FileNotFoundError(f"session file not found: {f}")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != SESSION_FORMAT:
            raise ValueError(f"{path}: not an ORION chat session (format {SESSION_FORMAT!r} expected)")
        tensors = load_file(weights)
        session = cls(system_prompt=doc.get("system_prompt"))
        for t, turn in enumerate(doc.get("turns", [])):
            parts: list[Part] = []
            for k, part in enumerate(turn.get("parts", [])):
                kind = part.get("type")
                if kind == "text":
                    parts.append(str(part["text"]))
                    continue
                key = part.get("key")
                if key not in tensors:
                    raise ValueError(f"{path}: turn {t} part {k} refers to {key!r}, missing from {weights}")
                if kind == "user_image":
                    parts.append(UserImage(Image.fromarray(tensors[key].numpy()), part.get("source", "")))
                elif kind == "generated_image":
                    parts.append(GeneratedImage(tensors[key], part.get("path", "")))
                else:
                    raise ValueError(f"{path}: turn {t} part {k} has unknown type {kind!r}")
            session.add(turn.get("role"), parts)
        return session
