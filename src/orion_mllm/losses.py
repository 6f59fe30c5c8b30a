"""Training losses for ORION: next-token CE, visual-token MSE and the KL representation-consistency term.

ORION trains one backbone with three objectives computed on the final-layer hidden states ``h_t``:

* **CE** on text targets through the LM head (weight ``W`` of shape ``[V, d]``, no bias);
* **MSE** between the vision head's prediction and the next visual token vector;
* **KL(p_teacher || p_student)** over the *full* vocabulary at the visual positions, where
  ``p = softmax(h @ W.T)`` and the teacher is a frozen copy of the base model run on the same inputs
  (its own hidden states and its own LM-head weight). It keeps generation training from eroding the
  model's understanding ("representation consistency").

The vocabulary of Qwen2.5-VL is 151,936 entries, so a ``[positions x vocab]`` logits tensor is huge
(8,192 positions in fp32 = 5 GB, and autograd keeps several of them alive). Nothing here ever builds
one: callers gather the relevant positions first (``hidden[mask]``), and the CE/KL losses then walk
the positions chunk by chunk and compute the gradient *inside the forward pass* (the
"fused linear cross-entropy" trick). Only the gradients wrt the student hidden states (``[n, d]``)
and the student weight (``[V, d]``) are kept for backward, so the peak memory is
``O(chunk_size x V) + O(V x d)`` no matter how many chunks there are.

Public API
----------
* :func:`kl_divergence_loss` - KL(teacher || student), backends ``"chunked"`` / ``"naive"`` /
  ``"liger"`` / ``"auto"``.
* :func:`cross_entropy_loss` - mean CE, chunked the same way.
* :func:`mse_loss` - mean squared error in fp32.
* :func:`naive_kl_reference` - full-logit reference (tests, benchmarks).
* :class:`ChunkedLinearKL`, :class:`ChunkedLinearCrossEntropy` - the autograd Functions.
* :class:`LossWeights` - the CE:MSE:KL weights (a recipe's ``loss`` section), validated once.
* :class:`LossTerms` - the unweighted terms of one forward (``OrionModel.forward``).
* :func:`step_loss`, :func:`step_metrics` - the objective: terms, weights and the micro-batch's
  share of the step's targets (:class:`TargetShares`) -> the scalar to backpropagate and the
  numbers to log. The trainer, ``benchmarks/train_step.py`` and the demo all go through it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ChunkedLinearCrossEntropy",
    "ChunkedLinearKL",
    "LossTerms",
    "LossWeights",
    "StepLoss",
    "TargetShares",
    "cross_entropy_loss",
    "kl_divergence_loss",
    "liger_available",
    "mse_loss",
    "naive_kl_reference",
    "step_loss",
    "step_metrics",
]

KLBackend = Literal["auto", "chunked", "naive", "liger"]
_KL_BACKENDS = ("auto", "chunked", "naive", "liger")

# Rows of a low-precision (bf16/fp16) weight that are upcast to fp32 at a time. Upcasting the whole
# LM head once would cost a full fp32 copy (2.2 GB for Qwen2.5-VL-7B, per weight); a tile keeps the
# extra memory at O(tile x d) (~117 MB at d=3584) while the logits are still computed in fp32.
_VOCAB_TILE = 8192
# Rows processed at a time by the elementwise softmax/KL passes inside one chunk. Working on
# row blocks keeps the temporaries of logsumexp/exp at O(block x V) instead of another
# O(chunk x V) buffer, so a chunk needs only two [chunk, V] buffers (student and teacher).
_ROW_BLOCK = 64


# --------------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; fp64 if any input is fp64 (so fp64 tests are meaningful)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _grad_store_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Dtype in which a gradient computed in forward is kept until backward.

    The gradient is computed with an implicit upstream gradient of 1 and only multiplied by the real
    ``grad_output`` in backward. fp16 cannot represent those unscaled values (fp16 loss scaling is
    applied later, through ``grad_output``), so they would underflow to zero: keep them in fp32.
    bf16 has fp32's exponent range, so bf16 storage is safe and halves the memory of ``grad_W``.
    """
    return torch.float32 if param_dtype == torch.float16 else param_dtype


# --------------------------------------------------------------------------------------------------
# chunk kernels (plain torch, run under no_grad inside the autograd Functions)
# --------------------------------------------------------------------------------------------------


def _tile_buffer(weight: Tensor, compute_dtype: torch.dtype) -> Tensor | None:
    """Reusable fp32 buffer for upcast weight tiles; None when the weight is already in compute dtype."""
    if weight.dtype == compute_dtype:
        return None
    rows = min(_VOCAB_TILE, weight.shape[0])
    return torch.empty((rows, weight.shape[1]), dtype=compute_dtype, device=weight.device)


def _linear(h: Tensor, weight: Tensor, compute_dtype: torch.dtype, tile: Tensor | None) -> Tensor:
    """``h @ weight.T`` as a fresh ``[c, V]`` tensor in ``compute_dtype``.

    A low-precision weight is upcast tile by tile into ``tile`` so the logits are exact fp32 products
    (no bf16 rounding of the logits) without ever holding an fp32 copy of the whole weight.
    """
    h = h.to(compute_dtype)
    if tile is None:
        return h @ weight.T
    n_vocab = weight.shape[0]
    out = torch.empty((h.shape[0], n_vocab), dtype=compute_dtype, device=h.device)
    for v0 in range(0, n_vocab, tile.shape[0]):
        v1 = min(v0 + tile.shape[0], n_vocab)
        w = tile[: v1 - v0]
        w.copy_(weight[v0:v1])
        out[:, v0:v1] = h @ w.T
    return out


def _log_softmax_(x: Tensor) -> Tensor:
    """In-place log-softmax over the last dim, by row blocks to keep temporaries small."""
    for r0 in range(0, x.shape[0], _ROW_BLOCK):
        block = x[r0 : r0 + _ROW_BLOCK]
        block.sub_(torch.logsumexp(block, dim=-1, keepdim=True))
    return x


class _KLTarget:
    """Target distribution q = softmax(teacher_hidden @ teacher_weight.T), computed per chunk."""

    def __init__(self, teacher_hidden: Tensor, teacher_weight: Tensor) -> None:
        # detach: the teacher is a constant; it must never receive gradient, even if the caller
        # forgot to run it under no_grad.
        self.hidden = teacher_hidden.detach()
        self.weight = teacher_weight.detach()
        self.float_tensors = (self.hidden, self.weight)  # they take part in choosing the compute dtype
        self._tile: Tensor | None = None

    def prepare(self, compute_dtype: torch.dtype) -> None:
        self._tile = _tile_buffer(self.weight, compute_dtype)

    def loss_and_grad_(self, logp: Tensor, start: int, end: int, compute_dtype: torch.dtype) -> Tensor:
        """Return sum_rows KL(q || p) and overwrite ``logp`` (log p) with d(sum)/d(logits) = p - q."""
        logq = _log_softmax_(_linear(self.hidden[start:end], self.weight, compute_dtype, self._tile))
        total = torch.zeros((), dtype=torch.float64, device=logp.device)
        for r0 in range(0, logp.shape[0], _ROW_BLOCK):
            lp = logp[r0 : r0 + _ROW_BLOCK]
            lq = logq[r0 : r0 + _ROW_BLOCK]
            q = lq.exp()
            # KL(q || p) = sum_v q (log q - log p); q underflowing to 0 contributes exactly 0.
            total += (q * (lq - lp)).sum(dtype=torch.float64)
            # d KL / d logits_p = softmax(logits_p) - q (log-softmax Jacobian applied to -q).
            lp.exp_().sub_(q)
        return total


class _CrossEntropyTarget:
    """Target distribution q = one_hot(targets)."""

    def __init__(self, targets: Tensor) -> None:
        self.targets = targets
        self.float_tensors: tuple[Tensor, ...] = ()

    def prepare(self, compute_dtype: torch.dtype) -> None:
        pass

    def loss_and_grad_(self, logp: Tensor, start: int, end: int, compute_dtype: torch.dtype) -> Tensor:
        """Return sum_rows -log p[y] and overwrite ``logp`` with d(sum)/d(logits) = p - one_hot(y)."""
        y = self.targets[start:end].unsqueeze(1)
        total = -logp.gather(1, y).sum(dtype=torch.float64)
        for r0 in range(0, logp.shape[0], _ROW_BLOCK):
            logp[r0 : r0 + _ROW_BLOCK].exp_()
        logp.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=logp.dtype))
        return total


def _accumulate_grads(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    tile: Tensor | None,
    grad_h_rows: Tensor | None,
    grad_w: Tensor | None,
    compute_dtype: torch.dtype,
) -> None:
    """``grad_h_rows = g @ W`` and ``grad_w += g.T @ h`` for one chunk (``g`` = d loss / d logits)."""
    h32 = h.to(compute_dtype)
    if tile is None:
        if grad_h_rows is not None:
            grad_h_rows.copy_(g @ weight)
        if grad_w is not None:
            grad_w.addmm_(g.T, h32)
        return
    # Low-precision weight: the same fp32 tiles as in _linear, each used for both products.
    n_vocab = weight.shape[0]
    gh = None if grad_h_rows is None else torch.zeros_like(grad_h_rows, dtype=compute_dtype)
    for v0 in range(0, n_vocab, tile.shape[0]):
        v1 = min(v0 + tile.shape[0], n_vocab)
        w = tile[: v1 - v0]
        w.copy_(weight[v0:v1])
        g_tile = g[:, v0:v1]
        if gh is not None:
            gh.addmm_(g_tile, w)
        if grad_w is not None:
            # one rounding to the storage dtype per chunk (bf16 for a bf16 weight)
            grad_w[v0:v1].add_(g_tile.T @ h32)
    if grad_h_rows is not None:
        grad_h_rows.copy_(gh)


def _chunked_forward(
    ctx: Any, hidden: Tensor, weight: Tensor, target: _KLTarget | _CrossEntropyTarget, chunk_size: int
) -> Tensor:
    """Shared chunk loop: mean over rows of ``target``'s loss, gradients computed on the fly.

    For every chunk of rows: student logits in fp32 -> log-softmax -> the target turns them into the
    summed loss and the gradient wrt the logits ``p - q`` (in place) -> scaled by 1/n for the mean ->
    immediately contracted into ``grad_hidden[rows] = g @ W`` and ``grad_W += g.T @ h[rows]``. The
    ``[chunk, V]`` buffers die at the end of the iteration, so peak memory does not depend on how
    many chunks there are. Only the two gradients are saved for backward.
    """
    # The math below picks its own precision (fp32 tiles); an enclosing autocast region (bf16 training
    # on GPU) would silently turn its matmuls into bf16 ones and mix dtypes in the in-place updates.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _chunked_forward_fp(ctx, hidden, weight, target, chunk_size)


def _chunked_forward_fp(
    ctx: Any, hidden: Tensor, weight: Tensor, target: _KLTarget | _CrossEntropyTarget, chunk_size: int
) -> Tensor:
    n, d = hidden.shape
    n_vocab = weight.shape[0]
    compute_dtype = _compute_dtype(hidden, weight, *target.float_tensors)
    need_h, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])

    grad_h = (
        torch.empty((n, d), dtype=_grad_store_dtype(hidden.dtype), device=hidden.device) if need_h else None
    )
    # n == 0 still yields an all-zero grad_W, so the weight gets a (zero) .grad like any other input.
    grad_w = (
        torch.zeros((n_vocab, d), dtype=_grad_store_dtype(weight.dtype), device=weight.device)
        if need_w
        else None
    )
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    tile = _tile_buffer(weight, compute_dtype)
    target.prepare(compute_dtype)
    inv_n = 1.0 / n if n else 0.0

    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        logp = _log_softmax_(_linear(h, weight, compute_dtype, tile))
        total += target.loss_and_grad_(logp, start, end, compute_dtype)
        if not (need_h or need_w):
            continue
        logp.mul_(inv_n)  # now the gradient of the *mean* loss wrt this chunk's logits
        _accumulate_grads(
            logp, h, weight, tile, None if grad_h is None else grad_h[start:end], grad_w, compute_dtype
        )
        # Drop the [chunk, V] buffer before the next chunk allocates its own (views of it must not
        # outlive this iteration either, which is why the contraction lives in a helper).
        del logp

    ctx.save_for_backward(grad_h, grad_w)
    ctx.input_dtypes = (hidden.dtype, weight.dtype)
    return (total * inv_n).to(compute_dtype)


def _chunked_backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    grad_h, grad_w = ctx.saved_tensors
    h_dtype, w_dtype = ctx.input_dtypes
    # A Python float keeps the scale exact (a bf16 cast would turn 0.01 into 0.010009...); the
    # multiply then runs in the kernel's fp32 "opmath" even for bf16 storage.
    scale = float(grad_output)
    out: list[Tensor | None] = []
    for g, dtype in ((grad_h, h_dtype), (grad_w, w_dtype)):
        if g is None:
            out.append(None)
        elif scale == 1.0:
            # The common `loss.backward()` case: hand the saved tensor over without a copy (saves a
            # full V x d buffer). Safe with retain_graph=True too: AccumulateGrad clones a gradient
            # that is still referenced elsewhere (here: by the saved graph) before storing it.
            out.append(g.to(dtype))
        else:
            # Out of place, so the saved gradient stays intact for a second backward (retain_graph).
            out.append(torch.mul(g, scale).to(dtype))
    return out[0], out[1]


class ChunkedLinearKL(torch.autograd.Function):
    """Mean over positions of KL(softmax(t_h @ t_W.T) || softmax(s_h @ s_W.T)), never all logits at once.

    ``apply(student_hidden [n,d], student_weight [V,d], teacher_hidden [n,d_t], teacher_weight [V,d_t],
    chunk_size)``. Gradients flow to the student hidden states and weight only; the teacher tensors
    are treated as constants (and are not kept alive for backward).
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        chunk_size: int,
    ) -> Tensor:
        return _chunked_forward(
            ctx, student_hidden, student_weight, _KLTarget(teacher_hidden, teacher_weight), chunk_size
        )

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*_chunked_backward(ctx, grad_output), None, None, None)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean over positions of CE(hidden @ weight.T, targets), chunked like :class:`ChunkedLinearKL`.

    ``apply(hidden [n,d], weight [V,d], targets [n] long, chunk_size)``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        return _chunked_forward(ctx, hidden, weight, _CrossEntropyTarget(targets), chunk_size)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*_chunked_backward(ctx, grad_output), None, None)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_linear_inputs(name: str, hidden: Tensor, weight: Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(
            f"{name}_hidden must be 2-D [positions, hidden]; gather the positions first "
            f"(e.g. hidden[mask]), got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{name}_weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}_hidden has hidden size {hidden.shape[1]} but {name}_weight has {weight.shape[1]}"
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"{name}_hidden and {name}_weight must be floating point")
    if hidden.device != weight.device:
        raise ValueError(f"{name}_hidden is on {hidden.device} but {name}_weight is on {weight.device}")


def _check_kl_inputs(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor
) -> None:
    _check_linear_inputs("student", student_hidden, student_weight)
    _check_linear_inputs("teacher", teacher_hidden, teacher_weight)
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student and teacher must cover the same positions: {student_hidden.shape[0]} vs "
            f"{teacher_hidden.shape[0]}"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_weight.shape[0]} vs {teacher_weight.shape[0]}"
        )
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"student is on {student_hidden.device} but teacher is on {teacher_hidden.device}")


def _zero_loss(*tensors: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero scalar that is connected to ``tensors`` so backward runs and yields zero gradients."""
    out = torch.zeros((), dtype=dtype, device=tensors[0].device)
    for t in tensors:
        out = out + t.sum().to(dtype) * 0.0
    return out


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def naive_kl_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Mean over positions of KL(p_teacher || p_student) from full ``[n, V]`` logits in ``dtype``.

    Plain autograd (differentiable wrt the student inputs, teacher under no_grad). Memory is
    O(n x V) several times over: for tests and benchmarks, not for training at scale.
    """
    _check_kl_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight)
    n = student_hidden.shape[0]
    if n == 0:
        return _zero_loss(student_hidden, student_weight, dtype=dtype)
    student_logp = F.log_softmax(student_hidden.to(dtype) @ student_weight.to(dtype).T, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_hidden.to(dtype) @ teacher_weight.to(dtype).T, dim=-1)
    # kl_div(input=log p_student, target=log p_teacher, log_target=True) = sum q (log q - log p).
    return F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True) / n


@functools.cache
def liger_available() -> bool:
    """True when ``liger_kernel``'s chunked JSD loss can be imported (it needs triton/CUDA torch)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        importlib.import_module("liger_kernel.chunked_loss")
    except Exception:  # broken install, missing triton, CPU-only torch, ...
        return False
    return True


# What Liger's `LigerFusedLinearJSDLoss` computes (looked up in linkedin/Liger-Kernel,
# src/liger_kernel/chunked_loss/jsd_loss.py + fused_linear_distillation.py):
#   * call: loss_fn(student_input, student_weight, teacher_input, teacher_weight, true_labels,
#     [student_bias, teacher_bias]) - biases were added to the signature in later releases;
#   * loss = weight_hard_loss * CE(student, true_labels) + weight_soft_loss * JSD_beta(student, teacher),
#     both summed per chunk and divided by the number of rows (= mean over positions), temperature 1;
#   * teacher logits are computed under no_grad; gradients are returned for student input/weight;
#   * the meaning of `beta` at the endpoints changed between releases. Recent main:
#       beta == 0 -> F.kl_div(student_logp, teacher_logp, log_target=True) = KL(teacher || student)
#       beta == 1 -> KL(student || teacher)
#     while an older release used M = beta*P_s + (1-beta)*P_t with weights (beta, 1-beta) on
#     (KL(T||M), KL(S||M)), where beta == 1 gives KL(teacher || student), and the ~0.5.10 formula
#     (M = (1-beta)*P_s + beta*P_t, no endpoint branches) degenerates to 0 at both endpoints.
#   * the distillation term is computed from logits in the *input* dtype (bf16 inputs -> bf16
#     log-softmax), unlike the chunked backend here which always works in fp32.
# Because of the version drift we do not trust a hard-coded beta: `_liger_forward_kl_beta` runs the
# installed version once on a tiny problem, checks which endpoint reproduces KL(teacher || student)
# against `naive_kl_reference`, and refuses to run if none does.
_LIGER_BETA_CANDIDATES = (0.0, 1.0)


def _make_liger_loss(beta: float, chunk_size: int, compiled: bool | None = None) -> Any:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    wanted: dict[str, Any] = {
        "weight_hard_loss": 0.0,  # pure distillation term, no CE
        "weight_soft_loss": 1.0,
        "beta": beta,
        "temperature": 1.0,
        "chunk_size": chunk_size,
    }
    if compiled is not None:
        wanted["compiled"] = compiled
    accepted = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    return LigerFusedLinearJSDLoss(**{k: v for k, v in wanted.items() if k in accepted})


def _call_liger(
    loss_fn: Any,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
) -> Tensor:
    # Labels are required by the signature; with weight_hard_loss=0 their CE contributes 0 * finite.
    # Valid class 0 (not ignore_index) so no version can turn an all-ignored mean into 0/0 = NaN.
    labels = torch.zeros(student_hidden.shape[0], dtype=torch.long, device=student_hidden.device)
    args: list[Any] = [
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        labels,
    ]
    if "student_bias" in inspect.signature(loss_fn.forward).parameters:
        args += [None, None]
    return loss_fn(*args)


def _liger_probe_inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A tiny fp32 problem on which KL(t||s) and KL(s||t) differ clearly (checked by the tests)."""
    gen = torch.Generator().manual_seed(0)
    n, d, n_vocab = 6, 16, 64
    sh, th = (torch.randn(n, d, generator=gen) for _ in range(2))
    sw, tw = (torch.randn(n_vocab, d, generator=gen) * 0.5 for _ in range(2))
    return sh, sw, th, tw


@functools.cache
def _liger_forward_kl_beta(device: str) -> float:
    """The ``beta`` for which the installed Liger computes KL(teacher || student); see note above."""
    probe = _liger_probe_inputs()
    want = naive_kl_reference(*probe).item()
    seen = {}
    for beta in _LIGER_BETA_CANDIDATES:
        loss_fn = _make_liger_loss(beta, chunk_size=1024, compiled=False)
        got = float(_call_liger(loss_fn, *(t.to(device) for t in probe)).item())
        seen[beta] = got
        # 1% tolerance: loose enough for TF32 matmuls, far tighter than the forward/reverse gap.
        if math.isclose(got, want, rel_tol=1e-2):
            return beta
    raise RuntimeError(
        "the installed liger_kernel's LigerFusedLinearJSDLoss does not reproduce KL(teacher || student) "
        f"at beta in {_LIGER_BETA_CANDIDATES} (reference {want:.6g}, got {seen}); "
        "upgrade liger-kernel or use backend='chunked'"
    )


def _liger_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    chunk_size: int,
) -> Tensor:
    if not student_hidden.is_cuda:
        raise RuntimeError(
            f"backend='liger' needs CUDA tensors (got {student_hidden.device}); use backend='chunked'"
        )
    if not liger_available():
        raise RuntimeError(
            "backend='liger' requested but liger_kernel is not importable; "
            "install it with `pip install 'orion-mllm[gpu]'` or use backend='chunked'"
        )
    if student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise ValueError("backend='liger' needs each hidden state and its weight in the same dtype")
    beta = _liger_forward_kl_beta(str(student_hidden.device))
    loss_fn = _make_liger_loss(beta, chunk_size)
    return _call_liger(loss_fn, student_hidden, student_weight, teacher_hidden, teacher_weight)


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
    _check_chunk_size(chunk_size)
    _check_kl_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight)
    if backend == "auto":
        backend = "liger" if student_hidden.is_cuda and liger_available() else "chunked"
    if backend == "naive":
        dtype = _compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
        return naive_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, dtype)
    if backend == "liger":
        if student_hidden.shape[0] == 0:  # Liger's chunking cannot split an empty batch
            return _zero_loss(student_hidden, student_weight, dtype=torch.float32)
        return _liger_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size)
    return ChunkedLinearKL.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size)


# --------------------------------------------------------------------------------------------------
# CE and MSE
# --------------------------------------------------------------------------------------------------


def cross_entropy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``targets`` (``[n]`` long, all valid ids), chunked.

    Same memory behaviour as :func:`kl_divergence_loss` with the chunked backend. Positions to skip
    (prompt, padding) must be dropped by the caller before the call; there is no ignore_index.
    ``n == 0`` gives a zero loss that still backpropagates.
    """
    _check_chunk_size(chunk_size)
    _check_linear_inputs("ce", hidden, weight)
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
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over all elements of ``(pred - target)**2``, computed in fp32 (fp64 for fp64 inputs).

    Shapes must match exactly (no broadcasting, which would silently compare the wrong tokens).
    An empty input gives a zero loss that still backpropagates.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    dtype = _compute_dtype(pred, target)
    if pred.numel() == 0:  # F.mse_loss would return nan (mean of nothing)
        return _zero_loss(pred, target, dtype=dtype)
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
