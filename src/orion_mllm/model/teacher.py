"""The KL teacher: the frozen base model whose text head the consistency term keeps the student near.

There is one kind of teacher object, :class:`KLTeacher`: a module around a frozen Qwen2.5-VL backbone
(without its vision tower: the student's frozen tower provides the visual tokens both read) whose
forward gives the final hidden states; the chunked KL reads its LM-head weight directly. It is built

* from the student before ORION training moves it (:func:`make_teacher`, an in-memory copy), or
* from where the run recorded the base model (:func:`load_teacher`: a model directory or a preset).

``OrionModel.forward`` accepts only a ``KLTeacher``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from orion_mllm.model.backbone import load_backbone
from orion_mllm.model.orion import OrionModel, backbone_hidden_states
from orion_mllm.sequence import Batch

__all__ = ["KLTeacher", "frozen_copy", "load_teacher", "make_teacher"]


class KLTeacher(nn.Module):
    """The frozen base model of the KL term, as a module whose forward gives final hidden states.

    A module of its own so that training can shard it (FSDP runs its hooks around ``forward``);
    the LM head weight is read directly by the chunked KL, outside the forward.
    """

    def __init__(self, backbone: Qwen2_5_VLForConditionalGeneration) -> None:
        super().__init__()
        self.backbone = backbone
        backbone.requires_grad_(False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.backbone.lm_head.weight

    @torch.no_grad()
    def forward(self, batch: Batch, visual_tokens: torch.Tensor | None) -> torch.Tensor:
        hidden, _ = backbone_hidden_states(self.backbone, batch, visual_tokens)
        return hidden


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An independent, frozen deep copy of ``module``: the KL teacher.

    Every parameter and buffer is copied into new storage, so training (or otherwise modifying) the
    student afterwards never changes the teacher, and vice versa. All parameters have
    ``requires_grad=False`` and the copy is in eval mode (no dropout). It costs a full second copy
    of the weights; the original module is left untouched (still trainable, same mode).
    """
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def make_teacher(model: OrionModel) -> KLTeacher:
    """A frozen, independent copy of the current backbone, for the KL consistency loss.

    Built *before* ORION training starts, so it stays the base model. The vision tower is dropped:
    the student's frozen tower already provides the visual tokens both models read.
    """
    visual = model.backbone.model.visual
    model.backbone.model.visual = None  # don't deep-copy what the teacher never runs
    try:
        teacher = frozen_copy(model.backbone)
    finally:
        model.backbone.model.visual = visual
    return KLTeacher(teacher)


def load_teacher(teacher: str, *, seed: int, attn_implementation: str, dtype: torch.dtype) -> KLTeacher:
    """The frozen base model for the KL term, without its vision tower (the student's provides tokens)."""
    if teacher.startswith("preset:"):
        backbone = OrionModel.from_preset(teacher.removeprefix("preset:"), seed=seed).backbone
    else:
        backbone, _ = load_backbone(teacher, attn_implementation=attn_implementation, dtype=torch.float32)
    backbone.model.visual = None
    backbone.eval()
    return KLTeacher(backbone.to(dtype))
