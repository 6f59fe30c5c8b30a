"""Training losses for ORION: next-token CE, visual-token MSE, the KL representation-consistency term,
their weights and the objective that combines them.

ORION trains one backbone with three objectives computed on the final-layer hidden states ``h_t``:

* **CE** on text targets through the LM head (weight ``W`` of shape ``[V, d]``, no bias);
* **MSE** between the vision head's prediction and the next visual token vector;
* **KL(p_teacher || p_student)** over the *full* vocabulary at the visual positions, where
  ``p = softmax(h @ W.T)`` and the teacher is a frozen copy of the base model run on the same inputs
  (its own hidden states and its own LM-head weight). It keeps generation training from eroding the
  model's understanding ("representation consistency").

CE and KL never form the ``[positions x vocab]`` logits: callers gather the positions first and the
chunked fused-linear kernels (``orion_mllm.kernels.chunked``) compute loss and gradient chunk by
chunk; on CUDA the KL can use Liger's fused kernel instead (``orion_mllm.kernels.liger``).

Public API
----------
* :func:`kl_divergence_loss` - KL(teacher || student), backends ``"chunked"`` / ``"naive"`` /
  ``"liger"`` / ``"auto"``.
* :func:`cross_entropy_loss` - mean CE, chunked the same way.
* :func:`mse_loss` - mean squared error in fp32.
* :class:`LossWeights` - the CE:MSE:KL weights (a recipe's ``loss`` section), validated once.
* :class:`LossTerms` - the unweighted terms of one forward (``OrionModel.forward``).
* :func:`step_loss`, :func:`step_metrics` - the objective: terms, weights and the micro-batch's
  share of the step's targets (:class:`TargetShares`) -> the scalar to backpropagate and the
  numbers to log. The trainer, ``benchmarks/train_step.py`` and the demo all go through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from orion_mllm.kernels.chunked import ChunkedLinearCrossEntropy, ChunkedLinearKL, math_dtype
from orion_mllm.kernels.liger import liger_available, liger_kl
from orion_mllm.kernels.reference import (
    check_chunk_size,
    check_kl_inputs,
    check_linear_inputs,
    naive_kl_reference,
    zero_loss,
)

__all__ = [
    "CE_WEIGHTINGS",
    "LossTerms",
    "LossWeights",
    "StepLoss",
    "TargetShares",
    "cross_entropy_loss",
    "kl_divergence_loss",
    "mse_loss",
    "response_weights",
    "step_loss",
    "step_metrics",
]

KLBackend = Literal["auto", "chunked", "naive", "liger"]
_KL_BACKENDS = ("auto", "chunked", "naive", "liger")


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def kl_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    chunk_size: int = 1024,
    backend: KLBackend = "auto",
) -> Tensor:
    """Mean over positions of KL(p_teacher || p_student), p = softmax(hidden @ weight.T), full vocab.

    Args:
        student_hidden: ``[n, d]`` student final-layer hidden states at the visual positions.
        student_weight: ``[V, d]`` student LM-head weight.
        teacher_hidden: ``[n, d_t]`` frozen teacher hidden states at the same positions (no grad).
        teacher_weight: ``[V, d_t]`` teacher LM-head weight (no grad).
        chunk_size: positions per chunk (chunked/liger); peak memory grows with it, not with n.
        backend: ``"chunked"`` (fused forward+gradient, fp32 math, CPU or CUDA), ``"naive"``
            (full logits through autograd, fp32 math, for reference), ``"liger"`` (Liger's fused
            CUDA kernel; math in the input dtype) or ``"auto"`` (liger for CUDA inputs when
            ``liger_kernel`` imports, else chunked).

    Returns a 0-dim tensor (fp32, or fp64 for fp64 inputs; whatever Liger returns for liger).
    ``n == 0`` gives a zero loss that still backpropagates (zero gradients).
    """
    if backend not in _KL_BACKENDS:
        raise ValueError(f"backend must be one of {_KL_BACKENDS}, got {backend!r}")
    check_chunk_size(chunk_size)
    check_kl_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight)
    if backend == "auto":
        backend = "liger" if student_hidden.is_cuda and liger_available() else "chunked"
    if backend == "naive":
        dtype = math_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
        return naive_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, dtype)
    if backend == "liger":
        if student_hidden.shape[0] == 0:  # Liger's chunking cannot split an empty batch
            return zero_loss(student_hidden, student_weight, dtype=torch.float32)
        return liger_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size)
    return ChunkedLinearKL.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size)


# --------------------------------------------------------------------------------------------------
# CE and MSE
# --------------------------------------------------------------------------------------------------


def cross_entropy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    *,
    row_weights: Tensor | None = None,
) -> Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``targets`` (``[n]`` long, all valid ids), chunked.

    Same memory behaviour as :func:`kl_divergence_loss` with the chunked backend. Positions to skip
    (prompt, padding) must be dropped by the caller before the call; there is no ignore_index.
    ``n == 0`` gives a zero loss that still backpropagates. ``row_weights`` ([n], >= 0, not all 0):
    the weighted mean ``sum(w * CE) / sum(w)`` instead (:func:`response_weights` makes them).
    """
    check_chunk_size(chunk_size)
    check_linear_inputs("ce", hidden, weight)
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets must be 1-D with one id per position ({hidden.shape[0]}), "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be torch.long, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets are on {targets.device} but hidden is on {hidden.device}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"targets must be in [0, {weight.shape[0]}), got min {lo} max {hi} "
                "(drop ignored positions before calling)"
            )
    if row_weights is not None:
        if row_weights.shape != targets.shape:
            raise ValueError(
                f"row_weights must have shape {tuple(targets.shape)}, got {tuple(row_weights.shape)}"
            )
        if targets.numel():
            total = row_weights.double().sum()
            if not bool(torch.isfinite(row_weights).all()) or bool((row_weights < 0).any()) or total <= 0:
                raise ValueError("row_weights must be finite, >= 0 and not all zero")
            # Scaled to mean 1, so the kernel's plain mean over rows is the weighted mean.
            row_weights = (row_weights.double() * (targets.numel() / total)).detach()
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, row_weights)


CE_WEIGHTINGS = ("token", "square")


def response_weights(valid: Tensor, weighting: str = "square") -> Tensor:
    """Per-target weights of the CE for ``valid`` ([B, S] bool: positions with a text target), in
    row-major order of its True entries (the order ``valid.nonzero()`` gives).

    A *response* is a run of consecutive target positions in a row (one assistant turn: turns and
    packed samples are separated by prompt positions, which have no target). ``token``: every target
    weighs 1 (the plain mean over tokens, where a 40-token caption outweighs a one-token answer 40 to
    1). ``square``: each target weighs 1 / sqrt(length of its response), InternVL 2.5's "square
    averaging", between per-token and per-response averaging."""
    if weighting not in CE_WEIGHTINGS:
        raise ValueError(f"CE weighting {weighting!r}: choose one of {', '.join(CE_WEIGHTINGS)}")
    flat = valid.reshape(-1)
    n = int(flat.sum())
    if weighting == "token" or n == 0:
        return torch.ones(n, device=valid.device)
    # A run starts where a target position follows a non-target one (or opens its row).
    prev = torch.zeros_like(valid)
    prev[:, 1:] = valid[:, :-1]
    starts = (valid & ~prev).reshape(-1)
    run_id = torch.cumsum(starts.long(), 0)[flat] - 1  # response index of each target position
    lengths = torch.bincount(run_id).float()
    return lengths[run_id].rsqrt()


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over all elements of ``(pred - target)**2``, computed in fp32 (fp64 for fp64 inputs).

    Shapes must match exactly (no broadcasting, which would silently compare the wrong tokens).
    An empty input gives a zero loss that still backpropagates.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    dtype = math_dtype(pred, target)
    if pred.numel() == 0:  # F.mse_loss would return nan (mean of nothing)
        return zero_loss(pred, target, dtype=dtype)
    return F.mse_loss(pred.to(dtype), target.to(dtype))


# --------------------------------------------------------------------------------------------------
# weighting
# --------------------------------------------------------------------------------------------------

_TERMS = ("ce", "mse", "kl")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the CE, MSE and KL terms (``total = ce*CE + mse*MSE + kl*KL``).

    Each weight must be a finite, non-negative number, and at least one must be positive.
    """

    ce: float
    mse: float
    kl: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"loss weight {f.name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"loss weight {f.name} must be finite, got {value!r}")
            if value < 0:
                raise ValueError(f"loss weight {f.name} must be >= 0, got {value!r}")
            object.__setattr__(self, f.name, value)
        if not any(getattr(self, name) > 0 for name in _TERMS):
            raise ValueError("at least one loss weight must be > 0, got ce=mse=kl=0")

    @classmethod
    def parse(cls, spec: str) -> LossWeights:
        """Parse the ``"CE:MSE:KL"`` form, e.g. ``"1:1:0.01"``."""
        if not isinstance(spec, str):
            raise TypeError(f"loss weights spec must be a string like '1:1:0.01', got {spec!r}")
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(
                f"loss weights must be 'CE:MSE:KL' (three numbers, e.g. '1:1:0.01'), got {spec!r}"
            )
        values: list[float] = []
        for name, part in zip(_TERMS, parts, strict=True):
            try:
                values.append(float(part.strip()))
            except ValueError:
                raise ValueError(
                    f"loss weight {name} in {spec!r} is not a number: {part.strip()!r}"
                ) from None
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.ce:g}:{self.mse:g}:{self.kl:g}"


@dataclass
class LossTerms:
    """The unweighted loss terms of one forward; a term that was not computed is ``None``."""

    ce: Tensor | None = None
    mse: Tensor | None = None
    kl: Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        """The computed terms as Python floats, for logging (``None`` terms are left out)."""
        return {
            name: float(term.detach().float().item())
            for name in _TERMS
            if (term := getattr(self, name)) is not None
        }


# --------------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetShares:
    """What one micro-batch's terms count for in its optimizer step.

    Each term is a mean over this micro-batch's targets; the step's loss is the mean over *all* the
    step's targets (every micro-batch, every rank), so a term is scaled by the micro-batch's share of
    them: ``text`` for CE, ``visual`` for MSE and KL. The defaults describe a step of one batch.
    """

    text: float = 1.0  # this micro-batch's text targets / the step's
    visual: float = 1.0  # this micro-batch's visual targets / the step's
    world_size: int = 1  # FSDP averages gradients over ranks: the loss is scaled back up by this
    dummy: bool = False  # a repeated micro-batch that only keeps FSDP ranks in step: counts 0

    @classmethod
    def of(
        cls,
        text: int,
        visual: int,
        step_text: float,
        step_visual: float,
        *,
        world_size: int = 1,
        dummy: bool = False,
    ) -> TargetShares:
        """Shares from target counts (a kind of target the step has none of gets share 0)."""
        text_share = text / step_text if step_text else 0.0
        visual_share = visual / step_visual if step_visual else 0.0
        return cls(text_share, visual_share, world_size, dummy)


@dataclass
class StepLoss:
    """One micro-batch's part of the objective."""

    loss: Tensor  # backpropagate this
    # Each term's mean times its share (0.0 where not computed, dummy or no share): summed over the
    # step's micro-batches and ranks, these are the step's term means that ``step_metrics`` logs.
    parts: tuple[float, float, float]


def step_loss(terms: LossTerms, weights: LossWeights, shares: TargetShares | None = None) -> StepLoss:
    """The objective of one micro-batch: ``sum_k weight_k * share_k * term_k`` and the logged parts.

    Terms weighted 0 are skipped (even if computed, even if NaN); a term with a positive weight that
    is ``None`` is an error naming the term. Every other term joins the graph, even with a zero
    factor (a dummy micro-batch, or no targets of that kind here): under FSDP every rank must
    produce gradients for the same parameters, or the gradient reduce-scatters would not match.
    """
    shares = shares or TargetShares()
    loss: Tensor | None = None
    parts = [0.0, 0.0, 0.0]
    for k, (name, share) in enumerate((("ce", shares.text), ("mse", shares.visual), ("kl", shares.visual))):
        weight = getattr(weights, name)
        if weight == 0:
            continue
        term = getattr(terms, name)
        if term is None:
            raise ValueError(f"loss term {name!r} has weight {weight:g} but was not computed (None)")
        if term.dim() != 0:
            raise ValueError(f"loss term {name!r} must be a scalar, got shape {tuple(term.shape)}")
        if not shares.dummy and share:
            parts[k] = float(term.detach()) * share
        part = term * (weight * share * shares.world_size if not shares.dummy else 0.0)
        loss = part if loss is None else loss + part
    assert loss is not None  # LossWeights guarantees one positive weight
    return StepLoss(loss, (parts[0], parts[1], parts[2]))


def step_metrics(parts: Sequence[float], weights: LossWeights) -> dict[str, float | None]:
    """The step's logged losses from its summed :attr:`StepLoss.parts` (over micro-batches and ranks):
    ``loss`` (the weighted total; NaN if any term is) and each term (``None`` when weighted 0)."""
    ce, mse, kl = parts
    total = weights.ce * ce + weights.mse * mse + weights.kl * kl
    if any(math.isnan(float(t)) for t in parts):
        total = float("nan")
    return {
        "loss": total,
        "ce": ce if weights.ce > 0 else None,
        "mse": mse if weights.mse > 0 else None,
        "kl": kl if weights.kl > 0 else None,
    }
