"""The drift probe's batches: a fixed set of generation records, encoded once with their image tokens.

Stages 2-3 log ``drift_kl`` on these batches (``Trainer._measure_drift``), and ``orion eval drift``
measures the same batches (``orion_mllm.eval.drift.DriftProbe``). The builder lives in the training
layer so that the trainer needs nothing from ``eval/``, which sits above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orion_mllm.data.records import encode_record
from orion_mllm.model.orion import OrionModel
from orion_mllm.sequence import Batch, attach_visual_tokens, collate


def probe_batches(
    model: OrionModel, records: Sequence[dict[str, Any]], *, batch_size: int = 16
) -> list[Batch]:
    """Batches of the conversation records whose assistant turn is an image (image paths absolute or
    PIL), with the model's ground-truth visual tokens attached; records that cannot be read, or have no
    generated image, are left out (empty list: nothing to probe)."""
    builder = model.sequence_builder()
    pad = model.processor.tokenizer.pad_token_id
    encoded = []
    with torch.no_grad():
        for i, record in enumerate(records):
            try:
                enc = encode_record(builder, record, record_id=str(record.get("id", i)))
            except (ValueError, OSError):  # an unreadable image or bad record: probe the others
                continue
            if enc.visual_positions.numel() == 0:  # no generated image: nothing to probe
                continue
            encoded.append(attach_visual_tokens(enc, model.encode_images))
    batches = [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
    return [b for b in batches if b.visual_positions.shape[0]]
