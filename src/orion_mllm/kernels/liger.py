"""The Liger backend of the KL term: ``LigerFusedLinearJSDLoss`` (fused CUDA/triton), made to compute
KL(teacher || student) whatever the installed release means by its ``beta``.

``losses.kl_divergence_loss(..., backend="liger")`` (or ``"auto"`` on CUDA when it imports) calls
:func:`liger_kl`; its inputs are checked there first.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from typing import Any

import torch
from torch import Tensor

from orion_mllm.kernels.reference import naive_kl_reference

__all__ = ["liger_available", "liger_kl"]


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


def liger_kl(
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
