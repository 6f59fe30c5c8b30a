"""Per-document attention for packed rows: ``model.attn_implementation: documents``.

A packed row holds several documents (samples) one after another; each must attend only to itself.
Through ``sdpa`` that is one dense call over the whole row with a block-diagonal causal mask, so a row
of 512 tokens holding eight documents of ~64 pays for 512 x 512 attention pairs where 8 x 64 x 64 are
used: on the CPU, where nothing skips masked blocks, attention was about as costly as every linear
layer together (benchmarks/BENCHMARKS.md, session 16). This implementation runs one causal ``sdpa``
call per document instead, found from the text row of the position ids (they restart at every
document, which is what transformers itself reads packing from); it is the CPU form of the
variable-length attention a GPU runs (issue 17). A batch with padding (unpacked, with a 2-D mask) goes
through the reference masked ``sdpa`` path unchanged, as does anything with a KV cache.

The language model alone uses it (the vision tower keeps its own per-image attention); the name is
registered with transformers' attention and mask interfaces on first use (:func:`register`), and a
saved model does not remember it (a directory loads with ``sdpa``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

RECIPE_NAME = "documents"  # model.attn_implementation in a recipe
REGISTERED_NAME = "orion_documents"  # the key in transformers' interfaces


# The last split: every layer of one forward gets the same position-ids tensor, so it is split once.
_last_split: tuple[torch.Tensor | None, list[list[tuple[int, int]]]] = (None, [])


def _bounds_of(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    global _last_split
    if _last_split[0] is not position_ids:
        _last_split = (position_ids, document_bounds(position_ids))
    return _last_split[1]


def document_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of ``position_ids`` [B, S] (the text row), the (start, end) of each document: a document
    starts where a position is not its predecessor's plus one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    bounds = []
    for row in starts.tolist():
        first = [i for i, s in enumerate(row) if s]
        bounds.append(list(zip(first, [*first[1:], length], strict=True)))
    return bounds


def document_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` [B, H, S, D], ``key`` / ``value``
    [B, H_kv, S, D]; returns [B, S, H, D]. Causal attention within each document of each row."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        if attention_mask is not None and attention_mask.ndim == 2:  # padding (the flash-style mask)
            length = query.shape[2]
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            keep = causal[None, None] & attention_mask[:, None, None, :].bool()
            attention_mask = keep | ~keep.any(-1, keepdim=True)  # a query with no key left: no NaN
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
    options = {"dropout_p": dropout, "scale": scaling}
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    rows = []
    for b, bounds in enumerate(_bounds_of(position_ids)):
        parts = []
        for s, e in bounds:
            q, k, v = query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]
            # one document: causal within it, nothing across
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, **options))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make the implementation known to transformers (idempotent); returns its registered name."""
    AttentionInterface.register(REGISTERED_NAME, document_attention)
    # The mask transformers builds for it: none for a packed or unpadded batch (the documents come from
    # the position ids), the 2-D padding mask otherwise, as for flash-attention.
    AttentionMaskInterface.register(REGISTERED_NAME, flash_attention_mask)
    return REGISTERED_NAME


def use_document_attention(backbone: nn.Module) -> None:
    """Switch a loaded Qwen2.5-VL backbone's language model to per-document attention."""
    backbone.config.text_config._attn_implementation = register()


__all__ = ["RECIPE_NAME", "document_attention", "document_bounds", "register", "use_document_attention"]
