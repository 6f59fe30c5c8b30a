"""Stage-0 base VLMs committed to the repository, so the quickstart's minutes go to ORION's own stages.

The paper starts from a released Qwen2.5-VL and trains only ORION's stages; the ShapesWorld presets
have no released base, so stage 0 trains one. A *committed base* is that stage-0 run, produced once
by ``python scripts/build_base.py --preset PRESET`` and kept under ``bases/PRESET/``:

- ``final/``: the base model directory (safetensors, config, tokenizer; a few MB);
- ``run.json``, ``recipe.yaml``: the trainer's own records of the run (its logs stay out of git);
- ``provenance.json``: the command, the resolved recipe of each stage-0 phase it was trained with
  (``orion_mllm.workflow.stage0``), the seed, the git commit, the wall time and the machine.

``orion quickstart`` uses it for its ``stage0_base`` step when the phases it would train (the tree's
``recipes/shapes/PRESET/stage0_*.yaml`` plus the quickstart's overrides, ``data_root`` aside) equal
the recorded ones, and refuses it otherwise: a base trained by other recipes is never used silently.
``--from-scratch`` ignores it and trains stage 0.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orion_mllm.train.recipe import Recipe, load_recipe
from orion_mllm.workflow.stage0 import phase_run_dirs, train_stage0

PROVENANCE = "provenance.json"
COPIED = ("final", "run.json", "recipe.yaml", PROVENANCE)  # not the run's logs: only what later stages read
MAX_BYTES = 25 * 1024 * 1024  # the budget for weights kept in git
# What a preset fixes of a model's shape, checked against a committed base (the vocabulary follows
# the tokenizer).
ARCH_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads")  # fmt: skip
ARCH_VISION_KEYS = ("hidden_size", "intermediate_size", "depth", "num_heads", "patch_size", "window_size",
                    "fullatt_block_indexes")  # fmt: skip


class BaseMismatch(ValueError):
    """The committed base was trained with another recipe than the one in the tree."""


def bases_root() -> Path:
    """The repository's ``bases/`` folder (the project is installed editable, as the README says)."""
    return Path(__file__).resolve().parents[3] / "bases"


def _compared_recipe(recipe_file: Path, overrides: list[str]) -> Recipe:
    """The recipe as the trainer would run it, without a ``data_root`` or ``model.init`` override."""
    kept = [o for o in overrides if not o.startswith(("data_root=", "model.init="))]
    return load_recipe(recipe_file, kept)


def _fingerprint(recipe: Recipe) -> dict[str, Any]:
    dumped = recipe.model_dump(mode="json")
    dumped.pop("data_root", None)
    return dumped


def recipe_fingerprint(recipe_file: Path, overrides: list[str]) -> dict[str, Any]:
    """The resolved recipe as the trainer would run it, without ``data_root`` (where the data is
    written does not change it: the data's settings are in ``shapes_data``) and without a
    ``model.init`` override (a later stage-0 phase starts from the previous phase, wherever it ran)."""
    return _fingerprint(_compared_recipe(recipe_file, overrides))


def recorded_phases(provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """The provenance's stage-0 phases (``recipe_file``, ``recipe``); a base built before stage 0 had
    phases recorded one recipe at the top level."""
    if isinstance(provenance.get("phases"), list):
        return provenance["phases"]
    keys = ("recipe_file", "recipe", "steps")
    return [{k: provenance.get(k) for k in keys}]


def unread_data_settings(recipe: Recipe) -> tuple[str, ...]:
    """The ``shapes_data`` keys (``shapes_data.NAME``) that cannot change any file ``recipe`` reads
    (its data entries and drift probe; ``FILE_SETTINGS``): e.g. where "add" edits put the new object,
    for a stage 0 that reads only ``und.jsonl``."""
    from orion_mllm.data.shapes.datasets import SETTINGS, settings_read_by

    files = [entry.path for entry in recipe.data]
    if recipe.drift.path is not None:
        files.append(recipe.drift.path)
    read = settings_read_by(files)
    return tuple(f"shapes_data.{k}" for k in SETTINGS if k not in read)


def phase_changes(phase: dict[str, Any], recipe_file: Path, overrides: list[str]) -> list[str]:
    """The keys where a recorded phase's recipe differs from ``recipe_file`` + ``overrides``. Keys added
    to recipes since the base was built count as their defaults (as for a resume); every other key
    counts, the step cap included: the base must be what this stage 0 would train. Only generator
    settings of files the phase never reads are left out (:func:`unread_data_settings`): the same
    data, byte for byte, trained it."""
    from orion_mllm.train.trainer import recipe_changes  # the trainer (torch) only when checking

    recorded = phase.get("recipe")
    if not isinstance(recorded, dict):
        return ["recipe"]
    recipe = _compared_recipe(recipe_file, overrides)
    return recipe_changes(recorded, _fingerprint(recipe), Recipe, ignore=unread_data_settings(recipe))


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


def check_base(folder: Path, recipe_files: Sequence[Path], overrides: list[str]) -> dict[str, Any]:
    """The base's provenance if its recorded stage-0 phases are ``recipe_files`` + ``overrides``, in
    order; else :class:`BaseMismatch` naming the first differing phase and keys."""
    provenance = read_provenance(folder)
    phases = recorded_phases(provenance)
    names = [Path(str(p.get("recipe_file"))).stem for p in phases]
    wanted_names = [f.stem for f in recipe_files]
    if names != wanted_names:
        raise BaseMismatch(
            f"{folder} was trained in the stage-0 phases {names}, the tree has {wanted_names}: rerun with "
            "--from-scratch, or rebuild it (python scripts/build_base.py)"
        )
    for phase, recipe_file in zip(phases, recipe_files, strict=True):
        keys = phase_changes(phase, recipe_file, overrides)
        if keys:
            raise BaseMismatch(
                f"{folder} was trained with another recipe than {recipe_file} (differs at "
                f"{', '.join(keys[:4])}): rerun with --from-scratch, or rebuild it "
                "(python scripts/build_base.py)"
            )
    if not (folder / "final" / "model.safetensors").is_file():
        raise ValueError(f"{folder}/final/model.safetensors missing: rebuild it with scripts/build_base.py")
    init = load_recipe(recipe_files[0], []).model.init
    if init.startswith("preset:"):
        # A preset's shape is code, not recipe: a base of the old shape would pass the recipe check.
        keys = architecture_changes(folder / "final", init.removeprefix("preset:"))
        if keys:
            raise BaseMismatch(
                f"{folder}/final has another architecture than the {init} preset (differs at "
                f"{', '.join(keys[:4])}): rerun with --from-scratch, or rebuild it "
                "(python scripts/build_base.py)"
            )
    return provenance


def architecture_changes(model_dir: Path, preset_name: str) -> list[str]:
    """The config keys (``text.NAME``, ``vision.NAME``) where the model in ``model_dir`` is built
    otherwise than the preset (the vocabulary size aside: it follows the tokenizer)."""
    from orion_mllm.config import get_preset

    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err}); rebuild it with scripts/build_base.py") from None
    preset = get_preset(preset_name)
    wanted = {
        "text": {k: getattr(preset.text, k) for k in ARCH_TEXT_KEYS},
        "vision": {k: getattr(preset.vision, k) for k in ARCH_VISION_KEYS},
    }
    found = {"text": config.get("text_config") or {}, "vision": config.get("vision_config") or {}}

    def plain(value: Any) -> Any:  # JSON holds lists where the preset holds tuples
        return list(value) if isinstance(value, list | tuple) else value

    return [
        f"{half}.{key}"
        for half, keys in wanted.items()
        for key, value in keys.items()
        if plain(found[half].get(key)) != plain(value)
    ]


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


def repo_relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(bases_root().parent))
    except ValueError:
        return str(path.resolve())


def machine() -> str:
    """The machine a committed run was trained on, as its provenance records it."""
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS={threads}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=bases_root().parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def reusable_phases(folder: Path, recipe_files: Sequence[Path], overrides: list[str]) -> list[dict[str, Any]]:
    """The recorded phases of the base in ``folder`` when they are the first phases of
    ``recipe_files`` (same names, same resolved recipes); else ValueError naming the difference."""
    recorded = recorded_phases(read_provenance(folder))
    names = [Path(str(p.get("recipe_file"))).stem for p in recorded]
    wanted = [f.stem for f in recipe_files]
    if len(names) >= len(wanted) or names != wanted[: len(names)]:
        raise ValueError(
            f"{folder}: its phases {names} are not the first of {wanted}; nothing of it can be reused"
        )
    for phase, recipe_file in zip(recorded, recipe_files, strict=False):
        keys = phase_changes(phase, recipe_file, overrides)
        if keys:
            raise ValueError(
                f"{folder}: trained with another {recipe_file.name} (differs at {', '.join(keys[:4])})"
            )
    return recorded


def build_base(
    recipe_files: Sequence[Path],
    target: Path,
    work_dir: Path,
    overrides: list[str] | None = None,
    command: str = "",
    reuse: Path | None = None,
) -> dict[str, Any]:
    """Train stage 0's phases (``recipe_files`` in order, each + ``overrides``) in ``work_dir`` and keep
    the result as a committed base in ``target`` (replaced only once the new one is complete).

    ``reuse``: a committed base whose recorded phases are the first of ``recipe_files``; its model is
    taken as their result and only the later phases train (their provenance is carried over, marked
    ``reused_from``). Returns the new provenance."""
    overrides = list(overrides or [])
    recipes = [load_recipe(f, overrides) for f in recipe_files]
    for recipe_file, recipe in zip(recipe_files, recipes, strict=True):
        if recipe.stage != "base":
            raise ValueError(f"{recipe_file}: stage {recipe.stage!r}, a committed base is stage-0 runs")

    def phase_overrides(recipe_file: Path) -> list[str]:
        recipe = load_recipe(recipe_file, overrides)
        if recipe.data_root is None or any(o.startswith("data_root=") for o in overrides):
            return overrides
        return [*overrides, f"data_root={work_dir / 'data' / Path(recipe.data_root).name}"]

    run_dir = work_dir / "stage0_base"
    dirs = phase_run_dirs(recipe_files, run_dir)
    reused: list[dict[str, Any]] = []
    reused_seconds = 0.0
    if reuse is not None:
        reused = reusable_phases(reuse, recipe_files, overrides)
        old = read_provenance(reuse)
        origin = {k: old.get(k) for k in ("command", "git_commit", "trained_at", "wall_seconds", "machine")}
        reused = [{**p, "reused_from": origin} for p in reused]
        reused_seconds = float(old.get("wall_seconds") or 0)
        if not (dirs[len(reused) - 1] / "run.json").is_file():
            install_base(reuse, dirs[len(reused) - 1])  # a finished run there: the trainer skips it
    t0 = time.time()
    # The same call as the quickstart's stage-0 step, on the recipes with the data under work_dir.
    train_stage0(recipe_files, run_dir, phase_overrides)
    seconds = time.time() - t0
    phases = list(reused)
    for recipe_file, phase_dir in list(zip(recipe_files, dirs, strict=True))[len(reused) :]:
        phases.append({
            "recipe_file": repo_relative(recipe_file),
            "recipe": recipe_fingerprint(recipe_file, phase_overrides(recipe_file)),
            "steps": json.loads((phase_dir / "run.json").read_text()).get("steps"),
        })  # fmt: skip
    provenance = {
        "command": command,
        "phases": phases,
        "seed": recipes[0].train.seed,
        "git_commit": git_commit(),
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # All phases' training time, the reused ones' as recorded when they were built.
        "wall_seconds": round(seconds + reused_seconds, 1),
        "wall_seconds_this_build": round(seconds, 1),
        "machine": machine(),
        "steps": sum(int(p.get("steps") or 0) for p in phases),
    }
    (run_dir / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    install_base(run_dir, target)
    size = folder_bytes(target)
    if size > MAX_BYTES:
        raise ValueError(f"{target}: {size / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB kept in git")
    return provenance


__all__ = [
    "BaseMismatch",
    "architecture_changes",
    "bases_root",
    "build_base",
    "check_base",
    "committed_base",
    "git_commit",
    "install_base",
    "machine",
    "phase_changes",
    "recipe_fingerprint",
    "recorded_phases",
    "repo_relative",
    "reusable_phases",
]
