"""Per-step training metrics: ``metrics.jsonl``, TensorBoard events, and a progress display.

One JSON object per optimizer step goes to ``RUN/metrics.jsonl`` (``step``, ``loss``, ``ce``, ``mse``,
``kl``, ``grad_norm``, ``lr``, ``tokens_per_s``, ``padding_share``, ``skipped_steps``,
``skipped_samples``, ...). On resume, lines of steps that will be trained again are dropped first
(rewritten atomically), so the file never holds a step twice. The same scalars go to TensorBoard
under ``RUN/tb``. On a terminal a tqdm bar with ETA shows progress; otherwise (CI, log files) a plain
line is printed every ``log_every`` steps. Only rank 0 writes anything.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    f = Path(run_dir) / METRICS_FILE
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _truncate_from(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        start_step: int,
        total_steps: int,
        enabled: bool = True,
        log_every: int = 10,
        tensorboard: bool = True,
        description: str = "train",
    ) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.writer = None
        self.bar = None
        self.file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        path = run_dir / METRICS_FILE
        _truncate_from(path, start_step)
        self.file = open(path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step)
            except ImportError:  # tensorboard is a dependency, but a stripped install still trains
                print("tensorboard is not installed: no TensorBoard events", file=sys.stderr)
        if sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and v is not None and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}", refresh=False)
        elif (step + 1) % self.log_every == 0 or step == self.start_step or step + 1 == self.total_steps:
            done = step + 1 - self.start_step
            elapsed = time.time() - self.t0
            eta = elapsed / done * (self.total_steps - step - 1) if done else float("nan")
            parts = " ".join(
                f"{k}={record[k]:.4g}"
                for k in ("loss", "ce", "mse", "kl", "grad_norm")
                if record.get(k) is not None
            )
            print(
                f"step {step + 1}/{self.total_steps} {parts} lr={record['lr']:.3e} "
                f"tok/s={record['tokens_per_s']:.0f} "
                f"skipped steps/samples={record['skipped_steps']}/{record['skipped_samples']} "
                f"eta={eta:.0f}s",
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
