"""Helpers for the training-engine tests: small micro ShapesWorld recipes, run in or out of process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orion_mllm.train.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "shapes" / "micro"


def micro_recipe(stage_file: str, data_root: str | Path, *overrides: str) -> Recipe:
    """A shipped micro recipe, shrunk for tests: batch 8, micro-batch 4, tensorboard-free. The tests
    bring their own (smaller) ShapesWorld folder, so the recipe's ``shapes_data`` is dropped: with it
    the run would refuse a folder written with other settings."""
    base = [
        f"data_root={data_root}",
        "shapes_data=",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=1",
    ]
    return load_recipe(RECIPES / stage_file, [*base, *overrides])


def losses(run_dir: str | Path) -> list[float]:
    from orion_mllm.train.metrics import read_metrics

    return [m["loss"] for m in read_metrics(run_dir)]


def run_python(code: str, *, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (a process we are allowed to kill)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )


def trainer_script(recipe: Recipe, run_dir: str | Path, *, prelude: str = "", callbacks: str = "[]") -> str:
    """Source of a process that trains ``recipe`` into ``run_dir`` (the recipe travels as JSON)."""
    data = json.dumps(recipe.model_dump(mode="json"))
    return f"""
import json, os, signal
from orion_mllm.train.recipe import parse_recipe
from orion_mllm.train.trainer import Trainer
{prelude}
recipe = parse_recipe(json.loads({data!r}))
Trainer(recipe, {str(run_dir)!r}, callbacks={callbacks}, tensorboard=False).run()
print("TRAINING-DONE")
"""


def _shape(value):
    """A JSON value with its leaves replaced by their type names; a list by its distinct element shapes."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        shapes = [_shape(v) for v in value]
        return [s for i, s in enumerate(shapes) if s not in shapes[:i]]
    return type(value).__name__


def checkpoint_format(path: str | Path) -> dict:
    """What a checkpoint directory's format is, without its numbers: its files, every DCP entry's
    dtype and shape, and the structure of ``trainer_state.json`` (keys and value types)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {
        k: [str(m.properties.dtype), list(m.size)] if hasattr(m, "size") else "bytes"
        for k, m in sorted(entries.items())
    }
    state = json.loads((path / "trainer_state.json").read_text())
    files = sorted(p.name for p in path.iterdir())
    return {"files": files, "tensors": tensors, "trainer_state": _shape(state)}
