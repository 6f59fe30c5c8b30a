"""Atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, ``RUN/checkpoints/step_00000040/``:

- DCP shards of ``{"model": ..., "optim": ...}`` (every rank writes its own part; a single process
  writes them all), so a checkpoint made by N ranks loads on M ranks;
- ``rng_rank{R}.pt``: each rank's torch / CUDA / numpy / Python RNG states;
- ``trainer_state.json``: step, data position, counters, anomaly guard, LR scheduler (rank 0);
- ``COMPLETE``: written last, by rank 0, after every rank has finished writing.

A directory without ``COMPLETE`` is never loaded (a crash mid-save leaves the previous complete
checkpoint as the one resumed) and is removed when the run restarts. After each save only the last
``keep`` complete checkpoints stay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from orion_mllm.train.distributed import DistState, barrier

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_"):
        return None
    try:
        return int(name.removeprefix("step_"))
    except ValueError:
        return None


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        step = _step_of(d)
        if step is not None and d.is_dir() and (d / MARKER).is_file():
            found.append((step, d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint directories a crash left without ``COMPLETE`` (rank 0 only)."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not (d / MARKER).is_file():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_marker(path: Path) -> None:
    """The last write of a checkpoint; its presence is what makes the checkpoint loadable."""
    _write_atomic(path / MARKER, "complete\n")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    dist_state: DistState,
    *,
    keep: int,
) -> Path:
    """Save model + optimizer (DCP), RNG states and trainer state; every rank must call this."""
    path = checkpoint_dir(run_dir, step)
    if dist_state.is_main and path.exists():
        shutil.rmtree(path)  # a leftover of a crashed save at the same step: never complete
    barrier(dist_state)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save(rng_state(), path / f"rng_rank{dist_state.rank}.pt")
    barrier(dist_state)  # every rank has written its part
    if dist_state.is_main:
        _write_atomic(path / TRAINER_STATE, json.dumps(trainer_state, indent=1) + "\n")
        write_marker(path)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist_state)
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist_state: DistState
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states; returns the trainer state."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise RuntimeError(f"{path} is not a complete checkpoint ({MARKER} missing); refusing to load it")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{dist_state.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh streams there
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / TRAINER_STATE).read_text())
