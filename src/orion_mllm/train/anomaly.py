"""Skipping anomalous optimizer steps: NaN/Inf losses and gradient-norm spikes.

A step is skipped (and counted) when its loss is not finite, its gradient norm is not finite, or
its gradient norm exceeds ``spike_factor`` x the running median of recent accepted norms (once
``min_history`` norms are known). ``max_consecutive`` skips in a row abort the run with an error
that says what happened, since by then the run is diverging rather than meeting a bad batch.
The guard's state is small and plain, so it is saved with checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any


class TrainingDiverged(RuntimeError):
    """Too many anomalous steps in a row."""


@dataclass
class AnomalyGuard:
    spike_factor: float = 10.0
    window: int = 200
    min_history: int = 20
    max_consecutive: int = 5
    skipped: int = 0
    consecutive: int = 0
    history: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.spike_factor <= 1 or self.window < 1 or self.min_history < 1 or self.max_consecutive < 1:
            raise ValueError("need spike_factor > 1 and positive window, min_history, max_consecutive")
        self.history = deque(self.history, maxlen=self.window)

    def reason(self, loss: float, grad_norm: float) -> str | None:
        """Why this step should be skipped, or None to take it."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if len(self.history) >= self.min_history:
            typical = median(self.history)
            if typical > 0 and grad_norm > self.spike_factor * typical:
                return f"gradient norm {grad_norm:.4g} > {self.spike_factor:g} x running median {typical:.4g}"
        return None

    def check(self, loss: float, grad_norm: float, step: int | None = None) -> bool:
        """Record one step; True means skip it. Raises ``TrainingDiverged`` after too many in a row."""
        why = self.reason(loss, grad_norm)
        if why is None:
            self.history.append(grad_norm)
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            where = f" at step {step}" if step is not None else ""
            raise TrainingDiverged(
                f"{self.consecutive} anomalous steps in a row{where} (last: {why}); "
                "lower the learning rate, check the data, or resume from an earlier checkpoint"
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
        self.history = deque(state["history"], maxlen=self.window)
