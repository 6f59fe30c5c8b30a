"""Learning-rate schedules of Table 1: linear warm-up by ratio, then constant or cosine to a minimum.

``lr_at(step)`` is a pure function of the step, so a resumed run gets exactly the same LR as an
uninterrupted one; ``build_scheduler`` wraps it in a ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    scheduler: str  # "constant" | "cosine"
    warmup_ratio: float
    total_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps}: need at least one optimizer step")
        if self.scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler={self.scheduler!r}: expected 'constant' or 'cosine'")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got {self.min_lr} and {self.max_lr}")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.total_steps)

    def lr_at(self, step: int) -> float:
        """LR used by optimizer step ``step`` (0-based)."""
        warm = self.warmup_steps
        if step < warm:
            return self.max_lr * (step + 1) / warm  # never 0: the first step already learns
        if self.scheduler == "constant":
            return self.max_lr
        span = max(1, self.total_steps - warm - 1)
        progress = min(1.0, (step - warm) / span)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following ``schedule`` (the optimizer's lr must be ``schedule.max_lr``)."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.max_lr
        group["initial_lr"] = schedule.max_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_at(step) / schedule.max_lr)
