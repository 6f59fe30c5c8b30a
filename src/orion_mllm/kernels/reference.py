"""Input checks shared by the KL/CE backends, and the naive full-logit KL they are measured against.

``naive_kl_reference`` forms the whole ``[n, V]`` logits through plain autograd: the definition of
the KL term in a few lines, the ``"naive"`` backend of ``losses.kl_divergence_loss``, and the
reference of the tests, the benchmarks and the Liger probe (``kernels/liger.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_chunk_size", "check_kl_inputs", "check_linear_inputs", "naive_kl_reference", "zero_loss"]

# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_linear_inputs(name: str, hidden: Tensor, weight: Tensor) -> None:
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


def check_kl_inputs(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor
) -> None:
    check_linear_inputs("student", student_hidden, student_weight)
    check_linear_inputs("teacher", teacher_hidden, teacher_weight)
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


def zero_loss(*tensors: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero scalar that is connected to ``tensors`` so backward runs and yields zero gradients."""
    out = torch.zeros((), dtype=dtype, device=tensors[0].device)
    for t in tensors:
        out = out + t.sum().to(dtype) * 0.0
    return out


# --------------------------------------------------------------------------------------------------
# the naive reference
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
    check_kl_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight)
    n = student_hidden.shape[0]
    if n == 0:
        return zero_loss(student_hidden, student_weight, dtype=dtype)
    student_logp = F.log_softmax(student_hidden.to(dtype) @ student_weight.to(dtype).T, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_hidden.to(dtype) @ teacher_weight.to(dtype).T, dim=-1)
    # kl_div(input=log p_student, target=log p_teacher, log_target=True) = sum q (log q - log p).
    return F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True) / n
