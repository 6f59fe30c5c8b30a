"""Sequence packing: several encoded conversations per row, with no attention across them.

``pack_first_fit_decreasing`` groups samples into rows of at most a token budget; ``collate_packed``
writes each group into one row of a ``Batch`` whose position ids restart at every sample, so
transformers attends block-diagonally and no sample sees another (``tests/test_packing.py`` checks
that a packed row computes what each sample computes alone). The trainer packs each step's samples
this way when ``train.packing`` is on (``train/batches.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orion_mllm.sequence import (
    IGNORE_INDEX,
    Batch,
    EncodedConversation,
    assemble_batch,
    shifted_source_index,
)

__all__ = ["collate_packed", "pack_first_fit_decreasing"]


def pack_first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices into bins whose lengths sum to at most ``budget`` (first-fit decreasing).

    Longest first (ties by index, so the result is deterministic); each goes into the first bin with
    room, else opens a new one. A length over the budget is an error: filter those out (and count
    them as skipped) before packing.
    """
    if budget <= 0:
        raise ValueError(f"packing budget must be positive, got {budget}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"sample {i} has negative length {n}")
        if n > budget:
            raise ValueError(f"sample {i} has length {n} > packing budget {budget}; filter it out first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, left in enumerate(room):
            if n <= left:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def collate_packed(
    bins: Sequence[Sequence[EncodedConversation]], pad_token_id: int, budget: int | None = None
) -> Batch:
    """Pack each bin of conversations into one row, right-padded to ``budget`` (or the longest row).

    No cross-contamination: every sample keeps its own position_ids (all four rows restart at its
    start), so the text row tells transformers where samples begin and it attends block-diagonally
    (``Batch.packed`` makes the model pass no attention mask). Padding restarts its text positions
    too, forming a segment of its own that no real token sees. ``attention_mask`` marks real tokens
    (1) vs padding (0); it is for counting only. Visual lists are concatenated row-major, sample by
    sample, which is the order the ``<|image_pad|>`` tokens appear in the flattened ``input_ids``.
    """
    if not bins or any(len(b) == 0 for b in bins):
        raise ValueError("collate_packed needs at least one bin and no empty bins")
    row_lengths = [sum(len(x) for x in b) for b in bins]
    width = max(row_lengths) if budget is None else budget
    for row, n in enumerate(row_lengths):
        if n > width:
            raise ValueError(f"bin {row} holds {n} tokens > packing budget {width}")
    bsz = len(bins)
    input_ids = torch.full((bsz, width), pad_token_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    mm_types = torch.zeros((bsz, width), dtype=torch.int)
    position_ids = torch.zeros((4, bsz, width), dtype=torch.long)
    vis_pos, vis_idx, vis_src, tokens, pixels, grids = [], [], [], [], [], []
    token_offset = 0
    for row, items in enumerate(bins):
        offset = 0
        for item in items:
            n = len(item)
            end = offset + n
            input_ids[row, offset:end] = item.input_ids
            labels[row, offset:end] = item.labels
            # labels are unshifted: labels[offset] would be predicted by the previous sample's last
            # hidden state. Alone, a sample's first label is never used (the shift drops it); same here.
            if n:
                labels[row, offset] = IGNORE_INDEX
            attention[row, offset:end] = 1
            mm_types[row, offset:end] = item.mm_token_type_ids
            position_ids[:, row, offset:end] = item.position_ids
            rows = torch.full_like(item.visual_positions, row)
            vis_pos.append(torch.stack([rows, item.visual_positions + offset], dim=1))
            vis_idx.append(item.visual_target_index + token_offset)
            vis_src.append(shifted_source_index(item, token_offset))
            token_offset += int(item.image_num_tokens.sum())
            if item.pixel_values is not None:
                pixels.append(item.pixel_values)
                grids.append(item.image_grid_thw)
            if item.visual_tokens is not None:
                tokens.append(item.visual_tokens)
            offset = end
        # Padding restarts at 0: its own segment (a jump in the text row), never attended by real tokens.
        position_ids[:, row, offset:] = torch.arange(width - offset)
    return assemble_batch(
        input_ids, attention, labels, position_ids, mm_types, vis_pos, vis_idx, tokens, pixels, grids,
        token_offset, packed=True, vis_src=vis_src,
    )  # fmt: skip
