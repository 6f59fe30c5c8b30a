"""The run skeleton both trainers share: the stage trainer (``trainer.py``) and the decoder trainer
(``decoder_trainer.py``) are ``RunLoop`` subclasses that supply their setup, their step and their export.

What the skeleton does, the same way for both:
- the run directory: ShapesWorld data generated when missing, ``run.json`` (a finished run is not
  redone; a run directory of another stage is refused), ``recipe.yaml``, leftovers of a crashed
  checkpoint save removed;
- resume from the newest complete checkpoint (trainer state checked before any weight is loaded);
- the step loop: the LR schedule advanced after every step (skipped ones too), one ``metrics.jsonl``
  line with progress/ETA per step, the bad-sample log and its cap, a checkpoint every
  ``checkpoint.every`` steps and at the end, the step callbacks;
- the finished mark in ``run.json``.
The optimizer, the anomaly guard's verdict and the export are the subclass's business.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orion_mllm.data.mixture import MixtureSampler
from orion_mllm.train import checkpoint as ckpt
from orion_mllm.train.anomaly import AnomalyGuard
from orion_mllm.train.batches import BadSample
from orion_mllm.train.distributed import DistState, broadcast_object
from orion_mllm.train.metrics import MetricsLogger, read_metrics
from orion_mllm.train.recipe import RunRecipe, recipe_to_yaml
from orion_mllm.train.schedule import LRSchedule, build_scheduler
from orion_mllm.train.setup import FINAL_MODEL, ensure_shapes_data, read_run_info, write_run_info

BAD_SAMPLES_LOG = "skipped_samples.jsonl"
# The bad-record cap is enforced once this many samples were read, so that one unlucky first batch
# of an otherwise clean corpus does not abort the run.
MIN_SAMPLES_FOR_BAD_CAP = 50

# One optimizer step: (step, the LR it uses, its start time) -> its metrics record.
StepFn = Callable[[int, float, float], dict[str, Any]]


class DataQualityError(RuntimeError):
    """Too many unreadable samples; the message names some of them."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and norm scales (1-D tensors), as usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class RunLoop:
    """Base of the trainers. A subclass sets ``recipe``, ``run_dir`` (resolved), ``dist``, ``callbacks``
    (called as ``cb(trainer, step, record)`` after each step) and ``tensorboard``, implements
    ``_run_fields`` and calls the steps below from its ``run``."""

    recipe: RunRecipe
    run_dir: Path
    dist: DistState
    callbacks: list[Callable[..., None]]
    tensorboard: bool

    def _log(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------ run directory

    def _run_fields(self, old: dict[str, Any] | None) -> dict[str, Any]:
        """What this kind of run records in ``run.json`` (``old``: the record of the run resumed)."""
        raise NotImplementedError

    def _prepare_run_dir(self) -> dict[str, Any]:
        """The run's ``run.json`` record, on every rank; ``status: finished`` means nothing is left to do."""
        r = self.recipe
        info = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ensure_shapes_data(r, progress=os.isatty(2))
            old = read_run_info(self.run_dir)
            if old is not None and old.get("stage") != r.stage:
                raise ValueError(
                    f"{self.run_dir} holds a {old.get('stage')!r} run; this recipe is stage {r.stage!r}: "
                    "choose another --output"
                )
            if old and old.get("status") == "finished" and (self.run_dir / FINAL_MODEL).is_dir():
                return broadcast_object(old, self.dist)  # nothing left to do
            fields = self._run_fields(old)
            (self.run_dir / "recipe.yaml").write_text(recipe_to_yaml(r))
            info = dict(old or {})
            info.update(stage=r.stage, **fields, status="running", final_model=FINAL_MODEL)
            info.setdefault("started_at", _now())
            write_run_info(self.run_dir, info)
            ckpt.remove_incomplete(self.run_dir)
        return broadcast_object(info, self.dist)

    def _mark_finished(self, info: dict[str, Any], total: int, **extra: Any) -> None:
        if self.dist.is_main:
            info = read_run_info(self.run_dir) or info
            info.update(status="finished", steps=total, **extra, finished_at=_now())
            write_run_info(self.run_dir, info)

    def _last_record(self, last: dict[str, Any]) -> dict[str, Any]:
        """The last step's record, read back when the run was killed after its last checkpoint."""
        if not last and self.dist.is_main:
            done = read_metrics(self.run_dir)
            return done[-1] if done else {}
        return last

    # ------------------------------------------------------------------ schedule and resume

    def total_steps(self, sampler: MixtureSampler) -> int:
        t = self.recipe.train
        steps = max(1, math.ceil(t.epochs * sampler.samples_per_epoch / t.global_batch_size))
        return min(steps, t.max_steps) if t.max_steps else steps

    def _schedule(self, optimizer: torch.optim.Optimizer, total: int) -> tuple[Any, AnomalyGuard]:
        """The recipe's LR schedule over ``total`` steps, and a fresh anomaly guard."""
        o = self.recipe.optim
        schedule = LRSchedule(o.max_lr, o.min_lr, o.scheduler, o.warmup_ratio, total)
        return build_scheduler(optimizer, schedule), AnomalyGuard(**self.recipe.anomaly.model_dump())

    def _check_resume(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this run must not continue (its trainer state, read before loading)."""

    def _resume(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: MixtureSampler,
        scheduler: Any,
        guard: AnomalyGuard,
        counters: dict[str, int],
        total: int,
    ) -> int:
        """Load the newest complete checkpoint, if any, into everything given; returns the first step
        to train. Also trims the bad-sample log to the steps before it."""
        start = 0
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None:
            state = json.loads((latest[1] / ckpt.TRAINER_STATE).read_text())  # check before loading
            self._check_resume(state)
            sampler.check_state(state["sampler"])
            if state["total_steps"] != total:
                raise ValueError(
                    f"{latest[1]}: made for a {state['total_steps']}-step run, this one has {total} steps "
                    "(epochs, batch size, max_steps or data changed); use a new --output"
                )
            state = ckpt.load_checkpoint(latest[1], module, optimizer, self.dist)
            start = state["step"]
            scheduler.load_state_dict(state["scheduler"])
            guard.load_state_dict(state["guard"])
            counters.update(state["counters"])
            self._log(f"resumed from {latest[1]} (step {start}/{total})")
        self._reload_bad(start)
        return start

    def _trainer_state(
        self, step: int, total: int, sampler: MixtureSampler, scheduler: Any, guard: AnomalyGuard,
        counters: dict[str, int],
    ) -> dict[str, Any]:  # fmt: skip
        """``trainer_state.json`` of the checkpoint after ``step`` steps."""
        return {
            "step": step, "total_steps": total, "sampler": sampler.state_dict(),
            "scheduler": scheduler.state_dict(), "guard": guard.state_dict(), "counters": counters,
        }  # fmt: skip

    # ------------------------------------------------------------------ the loop

    def _run_steps(
        self,
        step_fn: StepFn,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        guard: AnomalyGuard,
        sampler: MixtureSampler,
        counters: dict[str, int],
        start: int,
        total: int,
        description: str,
    ) -> dict[str, Any]:
        """Steps ``start`` .. ``total - 1``; returns the last step's record ({} when none ran).

        ``step_fn`` does one optimizer step (or skips it) and returns its metrics record; it counts
        its samples in ``counters`` and reports unreadable ones with ``_record_bad``. ``module`` and
        ``optimizer`` are what checkpoints hold."""
        r = self.recipe
        logger = MetricsLogger(
            self.run_dir,
            start_step=start,
            total_steps=total,
            enabled=self.dist.is_main,
            log_every=r.train.log_every,
            tensorboard=self.tensorboard,
            description=description,
        )
        last: dict[str, Any] = {}
        try:
            for step in range(start, total):
                t0 = time.time()
                lr = optimizer.param_groups[0]["lr"]  # what this step's update uses
                record = step_fn(step, lr, t0)
                with warnings.catch_warnings():  # a skipped step still advances the schedule
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                logger.log(record)
                last = record
                self._check_bad_share(counters)
                if (step + 1) % r.checkpoint.every == 0 or step + 1 == total:
                    state = self._trainer_state(step + 1, total, sampler, scheduler, guard, counters)
                    path = ckpt.save_checkpoint(
                        self.run_dir, step + 1, module, optimizer, state, self.dist, keep=r.checkpoint.keep
                    )
                    logger.message(f"checkpoint {path}")
                for cb in self.callbacks:
                    cb(self, step, record)
        finally:
            logger.close()
        return last

    # ------------------------------------------------------------------ bad data

    def _gather_bad(self, bad: list[BadSample]) -> list[BadSample]:
        if not self.dist.distributed:
            return list(bad)
        import torch.distributed as dist

        gathered: list[list[BadSample]] = [[] for _ in range(self.dist.world_size)]
        dist.all_gather_object(gathered, list(bad))
        return [b for part in gathered for b in part]

    def _record_bad(self, step: int, bad: list[BadSample]) -> None:
        if not bad or not self.dist.is_main:
            return
        with open(self.run_dir / BAD_SAMPLES_LOG, "a") as f:
            for b in bad:
                f.write(json.dumps({"step": step, "source": b.source, "reason": b.reason}) + "\n")
                print(f"skipped sample {b.source}: {b.reason}", flush=True)
        self.bad_seen = getattr(self, "bad_seen", []) + bad

    def _reload_bad(self, start: int) -> None:
        """On resume: drop log lines of steps that run again, and remember the earlier bad samples."""
        path = self.run_dir / BAD_SAMPLES_LOG
        if not self.dist.is_main or not path.is_file():
            return
        kept = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        kept = [x for x in kept if x.get("step", 0) < start]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in kept))
        tmp.replace(path)
        self.bad_seen = [BadSample(x["source"], x["reason"]) for x in kept]

    def _check_bad_share(self, counters: dict[str, int]) -> None:
        seen, bad = counters["seen_samples"], counters["skipped_samples"]
        cap = self.recipe.train.max_bad_sample_share
        if seen >= MIN_SAMPLES_FOR_BAD_CAP and bad > cap * seen:
            examples = "; ".join(f"{b.source} ({b.reason})" for b in getattr(self, "bad_seen", [])[:5])
            raise DataQualityError(
                f"{bad} of {seen} samples ({bad / seen:.1%}) could not be read, more than "
                f"train.max_bad_sample_share={cap:g}; e.g. {examples}; full list in "
                f"{self.run_dir / BAD_SAMPLES_LOG}"
            )
