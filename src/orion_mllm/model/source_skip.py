"""The edit-source skip: an edit's source picture carried cell by cell onto the picture it becomes.

ORION edits by attention alone: the source image sits in the user turn, and every token of the edited
image has to find "its" source cell among the context. At ShapesWorld scale that is learned slowly
and free-running edits drift to the mean picture (benchmarks/SMALL_SCALE.md, sessions 4-8). Image
editing models usually give the network the source at the same place instead (InstructPix2Pix
concatenates the source latent with the latent it denoises). ``SourceSkip`` is that, in token space,
for an edit whose source has the generation grid:

- ``inputs``: a linear map of the source token at cell j, added to the input embedding of the
  position that regresses the edited image's token j (the LLM reads the cell it rewrites);
- ``outputs``: the source token at cell j times a learned per-dimension gate, added to the vision
  head's prediction of token j: the head predicts what changes, the gate carries what stays.

The input map starts at zero; the gate starts at one, so from the first step an edit's prediction is
the source plus the head's change. (A zero gate would need ~1/lr Adam steps to open: 1000 at the tiny
recipes' LR, longer than stage 3.) Text-to-image and understanding never go through the skip, so
adding it to a trained model changes nothing for them. Which image is an edit's source is
``sequence.edit_sources``.
"""

from __future__ import annotations

import torch
from torch import nn


class SourceSkip(nn.Module):
    """Input map (zero at init) and output gate (one at init) of the edit-source skip (module docstring)."""

    def __init__(self, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.input = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.input.weight)
        self.output_gate = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def inputs(self, source: torch.Tensor) -> torch.Tensor:
        """What is added to the regressing positions' input embeddings: [..., d] -> [..., d]."""
        return self.input(source.to(self.input.weight.dtype))

    def outputs(self, source: torch.Tensor) -> torch.Tensor:
        """What is added to the vision head's predictions: [..., d] -> [..., d]."""
        return source.to(self.output_gate.dtype) * self.output_gate
