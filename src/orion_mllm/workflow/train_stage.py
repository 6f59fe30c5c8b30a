"""Train one stage (or the decoder) in this process: the one place the workflows call the trainers.

``orion quickstart``, ``orion ablate`` and stage 0's phases (``workflow.stage0``) all train through
:func:`train_stage`, so resuming, skipping a finished run and where the exported model lands work the
same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from orion_mllm.train.recipe import DecoderRecipe, RunRecipe, load_recipe


def step_cap(recipe: RunRecipe, cap: int | None) -> list[str]:
    """The override that caps a recipe's optimizer steps at ``cap`` (smoke runs, ``--max-steps``):
    never *more* steps than the recipe asks for (a stage of 200 steps stays at 200 under a cap of 700)."""
    if cap is None:
        return []
    own = recipe.train.max_steps
    return [f"train.max_steps={cap if own is None else min(own, cap)}"]


def train_stage(
    recipe_file: Path, run_dir: Path, overrides: list[str], *, expect_stage: str | None = None,
    network: Path | None = None,
) -> Path:  # fmt: skip
    """Train (or resume, or skip if finished) one stage in this process; returns its exported model.

    ``expect_stage``: refuse a recipe of another stage (e.g. ``base`` for stage 0's phases).
    ``network``: a decoder recipe's trained network (a committed decoder's ``final``): only its coarse map
    is fitted here (``DecoderTrainer.run_from_network``)."""
    recipe = load_recipe(recipe_file, overrides)
    if expect_stage is not None and recipe.stage != expect_stage:
        raise ValueError(f"{recipe_file}: stage {recipe.stage!r}, expected a {expect_stage!r} recipe")
    if isinstance(recipe, DecoderRecipe):
        from orion_mllm.train.decoder_trainer import DecoderTrainer

        trainer = DecoderTrainer(recipe, run_dir)
        return Path(trainer.run() if network is None else trainer.run_from_network(network))
    if network is not None:
        raise ValueError(f"{recipe_file}: a trained network is taken only by a decoder recipe")
    from orion_mllm.train.trainer import Trainer  # torch only when training

    return Path(Trainer(recipe, run_dir, recipe_path=str(recipe_file)).run().final_model)


__all__ = ["step_cap", "train_stage"]
