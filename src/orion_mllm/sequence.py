"""Conversation -> model inputs: token ids, embedding plan, labels, visual targets, M-RoPE positions.

A conversation is a list of turns (system / user / assistant) whose content interleaves text and
images. An image in a **user** turn is an input (understanding resolution); an image in an
**assistant** turn is a generation target (the fixed generation grid). Both are written as
``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>`` inside the text the model
directory's own chat template writes (``chat_template.py``), and training is teacher-forced: every
``<|image_pad|>`` gets its ground-truth visual token as input embedding.

What a training step needs, per conversation (``EncodedConversation``):

- ``input_ids`` [S] and ``labels`` [S] (Hugging Face convention, unshifted: ``labels[t]`` is the
  token the hidden state at t-1 must predict; -100 elsewhere). Supervised: what the assistant says
  as the template writes it, i.e. its text, the ``<|vision_start|>`` / ``<|vision_end|>`` around a
  generated image, and its end-of-turn token (``<|im_end|>``). Never user/system text or role
  headers, never ``<|image_pad|>``; nothing in a prompt (``add_generation_prompt=True``).
- ``visual_positions`` [K]: positions whose hidden state regresses a visual token: for each target
  image, the ``<|vision_start|>`` position (predicts v_1) and the first N-1 pads (v_j predicts
  v_{j+1}). ``visual_target_index`` [K] indexes the flat list of the conversation's visual tokens.
- ``visual_source_index`` [K]: for an edit, the flat index of the *source* image's token at the
  same grid cell as the token each position predicts (-1 where there is none). The source of a
  generated image is the image of the user turn right before its assistant turn, when that turn
  holds exactly one image and it has the generated image's grid (``edit_sources``). A model with
  ``source_skip`` adds a learned projection of it to that position's input (``model/orion.py``).
- ``position_ids`` [4, S]: row 0 = plain text positions (transformers uses it to keep packed
  samples apart), rows 1-3 = M-RoPE (temporal, height, width) per Qwen2.5-VL's rope-index rules.
- ``pixel_values`` / ``image_grid_thw`` / ``image_is_target``: the images, processed by the
  Qwen2.5-VL image processor, in order of appearance.

The encoder takes parsed ``Message`` lists; ``orion_mllm.data.records`` parses the record shapes
users have (plain message lists, ms-swift, LLaVA) into them (``encode_record`` does both steps).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from orion_mllm.chat_template import ChatTemplate, ChatTemplateError, expand_image_pads
from orion_mllm.images import (
    ImageLike,
    ImageSpec,
    load_image,
    resize_for_generation,
    resize_for_understanding,
)

IGNORE_INDEX = -100
# An ``<image>`` placeholder that its record gave no image for: ``data.records.parse_conversation``
# counts and reports those; the encoder refuses one that reaches it anyway.
MISSING_IMAGE = object()


class ConversationError(ValueError):
    """A record that cannot be turned into model inputs; the message names the record and the problem."""


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    image: ImageLike


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    parts: tuple[TextPart | ImagePart, ...]


def as_messages(conversation: Any, where: str) -> list[Message]:
    """The parsed messages ``SequenceBuilder.encode`` takes; anything else is refused, naming the parser."""
    if isinstance(conversation, Sequence) and all(isinstance(m, Message) for m in conversation):
        if not conversation:
            raise ConversationError(f"{where}: no messages")
        return list(conversation)
    raise TypeError(
        f"{where}: SequenceBuilder.encode takes parsed Messages; parse records and message dicts with "
        "orion_mllm.data.records.parse_conversation (or encode them with data.records.encode_record)"
    )


@dataclass
class EncodedConversation:
    """Model inputs for one conversation (see the module docstring for every field's meaning)."""

    input_ids: torch.Tensor  # [S] long
    labels: torch.Tensor  # [S] long, IGNORE_INDEX where unsupervised
    position_ids: torch.Tensor  # [4, S] long: text row + M-RoPE (t, h, w)
    mm_token_type_ids: torch.Tensor  # [S] int: 1 at <|image_pad|>, 0 elsewhere
    pixel_values: torch.Tensor | None  # [sum patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [num_images, 3] long
    image_is_target: torch.Tensor  # [num_images] bool: assistant-turn (generated) image
    image_num_tokens: torch.Tensor  # [num_images] long: visual tokens per image
    visual_positions: torch.Tensor  # [K] long
    visual_target_index: torch.Tensor  # [K] long, into the flat visual-token list
    rope_delta: int  # max M-RoPE position + 1 - S (what generation continues from)
    record_id: str = ""
    visual_source_index: torch.Tensor | None = None  # [K] long, -1 = no edit source (None: none at all)
    # A prompt (add_generation_prompt): the image an image in the reply would edit (``edit_sources``).
    reply_source_image: int | None = None
    visual_tokens: torch.Tensor | None = None  # [sum tokens, d] once attached (teacher forcing inputs)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def visual_targets(self) -> torch.Tensor:
        """The ground-truth next visual token for every visual position: [K, d]."""
        if self.visual_tokens is None:
            raise RuntimeError("visual tokens not attached yet: call attach_visual_tokens first")
        return self.visual_tokens[self.visual_target_index]

    def __len__(self) -> int:
        return int(self.input_ids.numel())


# ----------------------------------------------------------------------------- rope index


def mrope_positions(
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
    start: int = 0,
) -> torch.Tensor:
    """M-RoPE (t, h, w) positions [3, S] by Qwen2.5-VL's rope-index rules, for still images.

    Text advances all three rows by one per token. An image of merged grid (t, h', w') starting at
    position p gets (p + t_idx, p + h_idx, p + w_idx) in row-major order, and the text after it
    continues at p + max(h', w') (transformers' ``get_rope_index``; tested for equality).
    """
    types = mm_token_type_ids.tolist()
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    chunks: list[torch.Tensor] = []
    pos, i, n = start, 0, len(types)
    while i < n:
        j = i
        while j < n and types[j] == types[i]:
            j += 1
        if types[i] == 0:
            chunks.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        # One image per grid; consecutive images would share a run of 1s, so consume by size.
        while i < j:
            t, h, w = next(grids)
            hh, ww = h // spatial_merge_size, w // spatial_merge_size
            tt = torch.arange(t).view(-1, 1, 1).expand(t, hh, ww)
            yy = torch.arange(hh).view(1, -1, 1).expand(t, hh, ww)
            xx = torch.arange(ww).view(1, 1, -1).expand(t, hh, ww)
            chunks.append(torch.stack([tt, yy, xx]).reshape(3, -1) + pos)
            pos += max(hh, ww)
            i += t * hh * ww
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(chunks, dim=1).long()


# ----------------------------------------------------------------------------- encoding


class SequenceBuilder:
    """Turns conversations into ``EncodedConversation`` with a Qwen2.5-VL processor's parts and the
    chat template it carries (the model directory's own)."""

    def __init__(self, processor, image_spec: ImageSpec) -> None:
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.spec = image_spec
        self.merge = int(self.image_processor.merge_size)
        tok = self.tokenizer
        self.image_pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start_id = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tok.convert_tokens_to_ids("<|vision_end|>")
        self.im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.special_tokens = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()))
        vocab = tok.get_vocab()
        # A turn's supervised part ends with the first of these (the tokens generation stops on).
        stops = dict.fromkeys(t for t in (tok.eos_token, "<|im_end|>", "<|endoftext|>") if t in vocab)
        self.template = ChatTemplate(
            getattr(processor, "chat_template", None) or tok.chat_template,
            source=getattr(tok, "name_or_path", "") or "the model's processor",
            stop_tokens=list(stops),
            template_vars=tok.special_tokens_map,
        )

    # -- images

    def _process_images(
        self, images: list[tuple[ImageLike, bool]], where: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not images:
            return None, None
        prepared = []
        for k, (image, is_target) in enumerate(images):
            if image is MISSING_IMAGE:
                raise ConversationError(f"{where}: image placeholder {k} has no image")
            img = load_image(image, where=f"{where}, image {k}")
            prepared.append(
                resize_for_generation(img, self.spec)
                if is_target
                else resize_for_understanding(img, self.spec)
            )
        out = self.image_processor(images=prepared, return_tensors="pt")
        grid = out["image_grid_thw"].long()
        for k, ((_, is_target), g) in enumerate(zip(images, grid.tolist(), strict=True)):
            if is_target and tuple(g) != self.spec.gen_grid_thw:
                raise ConversationError(
                    f"{where}: generated image {k} got grid {g}, expected {self.spec.gen_grid_thw}: "
                    "the image processor resized it; check its min/max pixels"
                )
        return out["pixel_values"], grid

    # -- text

    def encode(
        self,
        conversation: Any,
        record_id: str = "",
        *,
        add_generation_prompt: bool = False,
        regress_images: bool = True,
    ) -> EncodedConversation:
        """Encode one record. ``add_generation_prompt`` appends an open assistant turn (inference).
        ``regress_images`` False: the assistant's pictures stay generated pictures (generation grid,
        ``<|vision_start|>`` ... ``<|vision_end|>``, read by later turns) but regress nothing (no
        ``visual_positions``, so no MSE, KL, input noise or edit source): for dialogues whose request
        does not determine the picture (a draw-then-ask dialogue's "Make a picture of some shapes.")."""
        where = f"record {record_id}" if record_id else "conversation"
        messages = as_messages(conversation, where)
        images = [
            (p.image, m.role == "assistant") for m in messages for p in m.parts if isinstance(p, ImagePart)
        ]
        pixel_values, grid = self._process_images(images, where)
        tokens_per_image = [] if grid is None else (grid.prod(-1) // (self.merge**2)).tolist()

        for k, part in enumerate(p for m in messages for p in m.parts if isinstance(p, TextPart)):
            found = [tok for tok in self.special_tokens if tok in part.text]
            if found:
                # Literal special tokens would be tokenised as control tokens (an early <|im_end|>,
                # a <|vision_start|> with no image) and supervised as such.
                raise ConversationError(f"{where}: text part {k} contains special token(s) {found}")
        # The directory's template writes the text (tests/test_chat_template.py: equal to transformers'
        # apply_chat_template + processor); a prompt has no targets, so no turn spans are needed.
        chat = [_template_message(m) for m in messages]
        if add_generation_prompt:
            rendered, spans = self.template.render(chat, add_generation_prompt=True), []
        else:
            rendered, spans = self.template.assistant_spans(chat)
        try:
            text, shift = expand_image_pads(rendered, tokens_per_image)
        except ValueError as err:
            raise ChatTemplateError(f"{self.template.source}: {err}") from None
        spans = [(shift(a), shift(b)) for a, b in spans]
        starts = [a for a, _ in spans]
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        input_ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            k = bisect.bisect_right(starts, a) - 1  # the last supervised span starting at or before a
            inside = k >= 0 and a < spans[k][1]
            # A token that merged across a span start (e.g. leading whitespace) still overlaps it.
            overlaps_next = k + 1 < len(spans) and spans[k + 1][0] < b
            if inside or overlaps_next:
                labels[t] = input_ids[t]
        labels[input_ids == self.image_pad_id] = IGNORE_INDEX

        mm_types = (input_ids == self.image_pad_id).int()
        n_pad = int(mm_types.sum())
        if n_pad != sum(tokens_per_image):
            raise ConversationError(
                f"{where}: found {n_pad} <|image_pad|> tokens but the images need {sum(tokens_per_image)}; "
                "remove literal special tokens from the text"
            )
        rope = mrope_positions(mm_types, grid, self.merge)
        seq_len = input_ids.numel()
        position_ids = torch.cat([torch.arange(seq_len).view(1, -1), rope], dim=0)
        rope_delta = int(rope.max()) + 1 - seq_len if seq_len else 0

        regressed = images if regress_images else [(image, False) for image, _ in images]
        visual_positions, visual_index = self._visual_targets(input_ids, regressed, tokens_per_image)
        sources, reply_source = edit_sources(messages, grid, add_generation_prompt=add_generation_prompt)
        source_index = _source_index(sources, regressed, tokens_per_image)
        return EncodedConversation(
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            mm_token_type_ids=mm_types,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            image_is_target=torch.tensor([t for _, t in images], dtype=torch.bool),
            image_num_tokens=torch.tensor(tokens_per_image, dtype=torch.long),
            visual_positions=visual_positions,
            visual_target_index=visual_index,
            rope_delta=rope_delta,
            record_id=record_id,
            visual_source_index=source_index,
            reply_source_image=reply_source,
        )

    def _visual_targets(
        self, input_ids: torch.Tensor, images: list[tuple[Any, bool]], tokens_per_image: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions that regress a visual token and the flat index of the token each one predicts."""
        pad_positions = (input_ids == self.image_pad_id).nonzero().flatten()
        positions, index = [], []
        offset = 0
        for (_, is_target), n_tok in zip(images, tokens_per_image, strict=True):
            if is_target:
                first = int(pad_positions[offset])
                last = first + n_tok - 1
                if (
                    first == 0
                    or input_ids[first - 1] != self.vision_start_id
                    or last + 1 >= input_ids.numel()
                    or input_ids[last + 1] != self.vision_end_id
                ):
                    # Generation opens an image with <|vision_start|> and closes it with <|vision_end|>.
                    raise ChatTemplateError(
                        f"the chat template of {self.template.source} does not write an assistant image "
                        "as <|vision_start|><|image_pad|><|vision_end|>, which image generation needs"
                    )
                # The hidden at <|vision_start|> (first - 1) predicts v_1; the hidden at v_j predicts v_{j+1}.
                positions.append(torch.arange(first - 1, first - 1 + n_tok))
                index.append(torch.arange(offset, offset + n_tok))
            offset += n_tok
        if not positions:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(positions), torch.cat(index)


def edit_sources(
    messages: Sequence[Message], grid: torch.Tensor | None, *, add_generation_prompt: bool = False
) -> tuple[list[int | None], int | None]:
    """Which image each image edits, and which one a reply's image would edit (indices in order of
    appearance; None: none).

    A generated (assistant) image's source is the image of the user turn right before its assistant
    turn, if that turn holds exactly one image with the same grid: an edit request. Anything else
    (text-to-image, several user images, another size) has none, so ``source_skip`` only ever
    carries a picture cell by cell onto the picture that replaces it.
    """
    owner: list[int] = [m for m, msg in enumerate(messages) for p in msg.parts if isinstance(p, ImagePart)]
    grids = [] if grid is None else [tuple(g) for g in grid.tolist()]

    def source_of(k_turn: int, target_grid: tuple[int, ...] | None) -> int | None:
        prev = k_turn - 1
        if prev < 0 or messages[prev].role != "user":
            return None
        mine = [k for k, m in enumerate(owner) if m == prev]
        if len(mine) != 1:
            return None
        if target_grid is not None and grids[mine[0]] != target_grid:
            return None
        return mine[0]

    sources: list[int | None] = [
        source_of(m, grids[k]) if messages[m].role == "assistant" else None for k, m in enumerate(owner)
    ]
    reply = None
    if add_generation_prompt and messages and messages[-1].role == "user":
        reply = source_of(len(messages), None)
    return sources, reply


def _source_index(
    sources: list[int | None], images: list[tuple[Any, bool]], tokens_per_image: list[int]
) -> torch.Tensor | None:
    """``visual_source_index`` in the order of ``_visual_targets`` (target images in order), or None
    when no target image has a source (or no image is a target)."""
    if not any(s is not None for s in sources):
        return None
    offsets = [0]
    for n in tokens_per_image:
        offsets.append(offsets[-1] + n)
    parts = []
    for k, (_, is_target) in enumerate(images):
        if not is_target:
            continue
        src = sources[k]
        n = tokens_per_image[k]
        parts.append(
            torch.full((n,), -1, dtype=torch.long)
            if src is None
            else torch.arange(offsets[src], offsets[src] + n)
        )
    return torch.cat(parts) if parts else None  # no regressed image: nothing to carry


def _template_message(message: Message) -> dict[str, Any]:
    """A message in the processor's multimodal form: the template writes an image item's placeholder."""
    content = [
        {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
        for p in message.parts
    ]
    return {"role": message.role, "content": content}


def attach_visual_tokens(
    encoded: EncodedConversation, encode_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> EncodedConversation:
    """Run the frozen visual encoder once and keep its tokens: the teacher-forcing inputs and targets."""
    if encoded.pixel_values is None:
        return replace(encoded, visual_tokens=None)
    tokens = encode_fn(encoded.pixel_values, encoded.image_grid_thw)
    expected = int(encoded.image_num_tokens.sum())
    if tokens.shape[0] != expected:
        raise ValueError(f"visual encoder returned {tokens.shape[0]} tokens, expected {expected}")
    return replace(encoded, visual_tokens=tokens)


# ----------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Right-padded conversations ready for ``OrionModel``; visual lists are concatenated in order."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [4, B, S]
    visual_tokens: torch.Tensor | None  # [sum tokens, d]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    visual_positions: torch.Tensor  # [K, 2] (row, position)
    visual_target_index: torch.Tensor  # [K] into visual_tokens
    mm_token_type_ids: torch.Tensor  # [B, S]
    # Several conversations per row (``collate_packed``): the model then passes no attention mask and
    # transformers separates the samples by where the text row of position_ids restarts.
    packed: bool = False
    # [K] into visual_tokens: each visual position's edit-source token (-1: none); None: no sources.
    visual_source_index: torch.Tensor | None = None

    @property
    def visual_targets(self) -> torch.Tensor:
        if self.visual_tokens is None:
            raise RuntimeError("batch has no visual tokens attached")
        return self.visual_tokens[self.visual_target_index]

    @property
    def num_real_tokens(self) -> int:
        """Tokens that belong to a conversation (not padding)."""
        return int(self.attention_mask.sum())

    @property
    def padding_share(self) -> float:
        """Fraction of the batch's [B, S] slots that are padding."""
        total = self.attention_mask.numel()
        return 1.0 - self.num_real_tokens / total if total else 0.0

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def collate(items: Sequence[EncodedConversation], pad_token_id: int) -> Batch:
    """Right-pad a list of encoded conversations into one batch."""
    if not items:
        raise ValueError("collate needs at least one conversation")
    width = max(len(x) for x in items)
    bsz = len(items)
    input_ids = torch.full((bsz, width), pad_token_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    mm_types = torch.zeros((bsz, width), dtype=torch.int)
    # Padding positions are masked out; give them increasing positions so nothing odd reaches RoPE.
    position_ids = torch.arange(width).view(1, 1, -1).repeat(4, bsz, 1)
    vis_pos, vis_idx, vis_src, tokens, pixels, grids = [], [], [], [], [], []
    token_offset = 0
    for row, item in enumerate(items):
        n = len(item)
        input_ids[row, :n] = item.input_ids
        labels[row, :n] = item.labels
        attention[row, :n] = 1
        mm_types[row, :n] = item.mm_token_type_ids
        position_ids[:, row, :n] = item.position_ids
        vis_pos.append(
            torch.stack([torch.full_like(item.visual_positions, row), item.visual_positions], dim=1)
        )
        vis_idx.append(item.visual_target_index + token_offset)
        vis_src.append(shifted_source_index(item, token_offset))
        token_offset += int(item.image_num_tokens.sum())
        if item.pixel_values is not None:
            pixels.append(item.pixel_values)
            grids.append(item.image_grid_thw)
        if item.visual_tokens is not None:
            tokens.append(item.visual_tokens)
    return assemble_batch(
        input_ids, attention, labels, position_ids, mm_types, vis_pos, vis_idx, tokens, pixels, grids,
        token_offset, packed=False, vis_src=vis_src,
    )  # fmt: skip


def shifted_source_index(item: EncodedConversation, token_offset: int) -> torch.Tensor:
    """``item.visual_source_index`` moved by ``token_offset`` (-1 stays -1; None becomes all -1)."""
    src = item.visual_source_index
    if src is None:
        return torch.full_like(item.visual_target_index, -1)
    return torch.where(src >= 0, src + token_offset, src)


def assemble_batch(
    input_ids, attention, labels, position_ids, mm_types, vis_pos, vis_idx, tokens, pixels, grids,
    n_visual_tokens: int, *, packed: bool, vis_src: list[torch.Tensor] | None = None,
) -> Batch:  # fmt: skip
    """The shared tail of ``collate`` and ``data.packing.collate_packed``: concatenate the per-sample
    visual lists."""
    if tokens and sum(t.shape[0] for t in tokens) != n_visual_tokens:
        raise ValueError("some conversations in the batch have visual tokens attached and others not")
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        position_ids=position_ids,
        visual_tokens=torch.cat(tokens) if tokens else None,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        visual_positions=torch.cat(vis_pos).long(),
        visual_target_index=torch.cat(vis_idx).long(),
        mm_token_type_ids=mm_types,
        packed=packed,
        visual_source_index=_any_source(vis_src),
    )


def _any_source(vis_src: list[torch.Tensor] | None) -> torch.Tensor | None:
    """The batch's source index, or None when no visual position has a source (no work to do)."""
    if not vis_src:
        return None
    index = torch.cat(vis_src).long()
    return index if bool((index >= 0).any()) else None
