"""Stage 0 in phases: the base VLM's understanding pre-training as a curriculum of recipe files.

A preset's stage 0 is ``stage0_base.yaml`` followed by each later phase that preset has, in the order
of ``LATER_PHASES``:

- ``stage0_mcq.yaml``: multiple-choice questions only. Mixed into the whole data (even at 40% of the
  samples) they stayed at 0 (the model answers one letter whatever the options); alone, from a base
  that already knows colours, they are learned (benchmarks/SMALL_SCALE.md, sessions 5 and 6).
- ``stage0_recap.yaml``: a short return to the whole mix, which brings the other question types back
  without losing multiple choice.

Each phase starts from the previous phase's final model (``model.init`` is set here). The earlier
phases train in ``RUN.phases/NAME`` beside the stage-0 run folder ``RUN``; the last one trains in
``RUN`` itself, so every later stage finds the base where it always has (``RUN/final``, and
``RUN/run.json`` as the one finished stage-0 run among its siblings). A preset with only
``stage0_base.yaml`` trains exactly as before. Re-running resumes: finished phases are skipped by the
trainer and an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from orion_mllm.workflow.train_stage import train_stage

FIRST_PHASE = "stage0_base"
LATER_PHASES = ("stage0_mcq", "stage0_recap")


def stage0_recipe_files(first: Path) -> list[Path]:
    """``first`` (a preset's ``stage0_base.yaml``) and the later phases beside it, in training order."""
    if first.stem != FIRST_PHASE:
        return [first]
    later = [first.with_name(f"{name}.yaml") for name in LATER_PHASES]
    return [first] + [f for f in later if f.is_file()]


def phase_run_dirs(recipe_files: Sequence[Path], run_dir: Path) -> list[Path]:
    """Where each phase trains: the earlier ones in ``RUN.phases/NAME``, the last in ``RUN``."""
    earlier = run_dir.with_name(f"{run_dir.name}.phases")
    return [earlier / f.stem for f in recipe_files[:-1]] + [run_dir]


def train_stage0(
    recipe_files: Sequence[Path], run_dir: Path, overrides_for: Callable[[Path], list[str]]
) -> list[Path]:
    """Train (or resume, or skip when finished) every phase in order; returns each phase's final model.

    ``overrides_for(recipe_file)`` gives that phase's overrides (its data folder, a smoke-run step cap);
    every phase after the first also gets ``model.init`` = the previous phase's final model.
    """
    finals: list[Path] = []
    for recipe_file, phase_dir in zip(recipe_files, phase_run_dirs(recipe_files, run_dir), strict=True):
        overrides = list(overrides_for(recipe_file))
        if finals:
            overrides.append(f"model.init={finals[-1]}")
        finals.append(train_stage(recipe_file, phase_dir, overrides, expect_stage="base").resolve())
    return finals


__all__ = ["FIRST_PHASE", "LATER_PHASES", "phase_run_dirs", "stage0_recipe_files", "train_stage0"]
