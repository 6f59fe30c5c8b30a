"""Stage-0 base VLMs committed to the repository, so the quickstart's minutes go to ORION's own stages.

The paper starts from a released Qwen2.5-VL and trains only ORION's stages; the ShapesWorld presets
have no released base, so stage 0 trains one. A *committed base* is that stage-0 run, produced once
by ``python scripts/build_base.py --preset PRESET`` and kept under ``bases/PRESET/``:

- ``final/``: the base model directory (safetensors, config, tokenizer; a few MB);
- ``run.json``, ``recipe.yaml``: the trainer's own records of the run (its logs stay out of git);
- ``provenance.json``: the command, the resolved recipe it was trained with, the seed, the git commit,
  the wall time and the machine.

``orion quickstart`` uses it for its ``stage0_base`` step when the recipe it would train with (the
tree's ``recipes/shapes/PRESET/stage0_base.yaml`` plus the quickstart's overrides, ``data_root``
aside) equals the recorded one, and refuses it otherwise: a base trained by another recipe is never
used silently. ``--from-scratch`` ignores it and trains stage 0.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from orion_mllm.train.recipe import Recipe, load_recipe

PROVENANCE = "provenance.json"
COPIED = ("final", "run.json", "recipe.yaml", PROVENANCE)  # not the run's logs: only what later stages read
MAX_BYTES = 25 * 1024 * 1024  # the budget for weights kept in git


class BaseMismatch(ValueError):
    """The committed base was trained with another recipe than the one in the tree."""


def bases_root() -> Path:
    """The repository's ``bases/`` folder (the project is installed editable, as the README says)."""
    return Path(__file__).resolve().parents[3] / "bases"


def recipe_fingerprint(recipe_file: Path, overrides: list[str]) -> dict[str, Any]:
    """The resolved recipe as the trainer would run it, without ``data_root`` (where the data is
    written does not change it: the data's settings are in ``shapes_data``)."""
    resolved = load_recipe(recipe_file, [o for o in overrides if not o.startswith("data_root=")])
    dumped = resolved.model_dump(mode="json")
    dumped.pop("data_root", None)
    return dumped


def committed_base(preset: str, root: Path | None = None) -> Path | None:
    """``bases/PRESET`` if a base is committed for ``preset``."""
    folder = (root or bases_root()) / preset
    return folder if (folder / PROVENANCE).is_file() else None


def read_provenance(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err}); rebuild it with scripts/build_base.py") from None


def check_base(folder: Path, recipe_file: Path, overrides: list[str]) -> dict[str, Any]:
    """The base's provenance if its recorded recipe equals ``recipe_file`` + ``overrides``; else
    :class:`BaseMismatch` naming the first differing keys."""
    provenance = read_provenance(folder)
    from orion_mllm.train.trainer import recipe_changes  # the trainer (torch) only when checking

    recorded, wanted = provenance.get("recipe"), recipe_fingerprint(recipe_file, overrides)
    # Keys added to recipes since the base was built count as their defaults (as for a resume); here
    # every key counts, the step cap included: the base must be what this stage 0 would train.
    keys = recipe_changes(recorded, wanted, Recipe, ignore=()) if isinstance(recorded, dict) else ["recipe"]
    if keys:
        raise BaseMismatch(
            f"{folder} was trained with another recipe than {recipe_file} (differs at "
            f"{', '.join(keys[:4])}): rerun with --from-scratch, or rebuild it "
            "(python scripts/build_base.py)"
        )
    if not (folder / "final" / "model.safetensors").is_file():
        raise ValueError(f"{folder}/final/model.safetensors missing: rebuild it with scripts/build_base.py")
    return provenance


def install_base(folder: Path, run_dir: Path) -> None:
    """Copy the committed run into ``run_dir`` (a temporary folder renamed at the end, so an
    interrupted copy is never taken for a finished stage-0 run)."""
    tmp = run_dir.with_name(f".{run_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPIED:
        src = folder / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp.replace(run_dir)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _repo_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(bases_root().parent))
    except ValueError:
        return str(path.resolve())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=bases_root().parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def build_base(
    recipe_file: Path, target: Path, work_dir: Path, overrides: list[str] | None = None, command: str = ""
) -> dict[str, Any]:
    """Train stage 0 with ``recipe_file`` (+ ``overrides``) in ``work_dir`` and keep the run as a
    committed base in ``target`` (replaced only once the new one is complete). Returns its provenance."""
    from orion_mllm.train.trainer import Trainer

    overrides = list(overrides or [])
    recipe = load_recipe(recipe_file, overrides)
    if recipe.stage != "base":
        raise ValueError(f"{recipe_file}: stage {recipe.stage!r}, a committed base is a stage-0 (base) run")
    if recipe.data_root is not None and not any(o.startswith("data_root=") for o in overrides):
        overrides.append(f"data_root={work_dir / 'data' / Path(recipe.data_root).name}")
    run_dir = work_dir / "stage0_base"
    t0 = time.time()
    # The same trainer call as the quickstart's stage-0 step, on the recipe with the data under work_dir.
    Trainer(load_recipe(recipe_file, overrides), run_dir, recipe_path=str(recipe_file)).run()
    seconds = time.time() - t0
    provenance = {
        "command": command,
        "recipe_file": _repo_relative(recipe_file),
        "recipe": recipe_fingerprint(recipe_file, overrides),
        "seed": recipe.train.seed,
        "git_commit": _git_commit(),
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "steps": json.loads((run_dir / "run.json").read_text()).get("steps"),
    }
    (run_dir / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    install_base(run_dir, target)
    size = folder_bytes(target)
    if size > MAX_BYTES:
        raise ValueError(f"{target}: {size / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB kept in git")
    return provenance


__all__ = [
    "BaseMismatch",
    "bases_root",
    "build_base",
    "check_base",
    "committed_base",
    "install_base",
    "recipe_fingerprint",
]
