"""Fused linear + softmax losses that never hold all logits: the chunked CE and KL autograd Functions.

The vocabulary of Qwen2.5-VL is 151,936 entries, so a ``[positions x vocab]`` logits tensor is huge
(8,192 positions in fp32 = 5 GB, and autograd keeps several of them alive). Nothing here ever builds
one: callers gather the relevant positions first (``hidden[mask]``), and the CE/KL losses then walk
the positions chunk by chunk and compute the gradient *inside the forward pass* (the
"fused linear cross-entropy" trick). Only the gradients wrt the student hidden states (``[n, d]``)
and the student weight (``[V, d]``) are kept for backward, so the peak memory is
``O(chunk_size x V) + O(V x d)`` no matter how many chunks there are.

Used through ``orion_mllm.losses`` (``cross_entropy_loss``, ``kl_divergence_loss``), which checks
the inputs first; these Functions assume valid ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ChunkedLinearCrossEntropy", "ChunkedLinearKL", "math_dtype"]

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


def math_dtype(*tensors: Tensor) -> torch.dtype:
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
    """Target distribution q = one_hot(targets), each row optionally weighted by ``row_weights``."""

    def __init__(self, targets: Tensor, row_weights: Tensor | None = None) -> None:
        self.targets = targets
        self.row_weights = row_weights
        self.float_tensors: tuple[Tensor, ...] = ()

    def prepare(self, compute_dtype: torch.dtype) -> None:
        pass

    def loss_and_grad_(self, logp: Tensor, start: int, end: int, compute_dtype: torch.dtype) -> Tensor:
        """Return sum_rows w * -log p[y] and overwrite ``logp`` with d(sum)/d(logits) = w (p - one_hot(y))
        (w = 1 without row weights)."""
        y = self.targets[start:end].unsqueeze(1)
        picked = logp.gather(1, y)
        w = None if self.row_weights is None else self.row_weights[start:end].to(logp.dtype).unsqueeze(1)
        total = -(picked if w is None else picked * w).sum(dtype=torch.float64)
        for r0 in range(0, logp.shape[0], _ROW_BLOCK):
            logp[r0 : r0 + _ROW_BLOCK].exp_()
        logp.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=logp.dtype))
        if w is not None:
            logp.mul_(w)
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
    compute_dtype = math_dtype(hidden, weight, *target.float_tensors)
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

    ``apply(hidden [n,d], weight [V,d], targets [n] long, chunk_size, row_weights [n] or None)``; with
    ``row_weights`` the mean is of ``row_weights * CE`` (no gradient flows into the weights).
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
        row_weights: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        return _chunked_forward(ctx, hidden, weight, _CrossEntropyTarget(targets, row_weights), chunk_size)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (*_chunked_backward(ctx, grad_output), None, None, None)
