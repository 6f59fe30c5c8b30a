"""``orion train``: one training stage from a recipe (or the decoder's), in this process or under torchrun."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from orion_mllm.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # fail fast, before any process is spawned
    output = args.output or str(_default_output(args.recipe))
    if recipe.stage == "decoder":
        from orion_mllm.train.decoder_trainer import DecoderTrainer

        final = DecoderTrainer(recipe, output).run()
        print(json.dumps({"run_dir": str(Path(output).resolve()), "final_model": str(final)}))
        return 0
    from orion_mllm.train.launch import launch_local, under_torchrun

    if args.nproc > 1 and not under_torchrun():
        rc = launch_local(recipe, args.recipe, output, args.overrides, nproc=args.nproc, debug=args.debug)
        if rc != 0:  # reported by ``main`` like any other error: one line, exit 2
            raise ChildProcessError(f"a training process failed (exit {rc}); see rank 0's message above")
        return 0
    from orion_mllm.train.trainer import Trainer

    result = Trainer(recipe, output, recipe_path=str(args.recipe)).run()
    if result.run_dir and int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "run_dir": str(result.run_dir),
                    "final_model": str(result.final_model),
                    "steps": result.steps,
                    "skipped_steps": result.skipped_steps,
                    "skipped_samples": result.skipped_samples,
                    "last": {k: result.last_metrics.get(k) for k in ("loss", "ce", "mse", "kl")},
                }
            )
        )
    return 0


def _default_output(recipe: str):
    from orion_mllm.train.trainer import default_output_dir

    return default_output_dir(recipe)


def add_train(sub: argparse._SubParsersAction) -> None:
    """``orion train``."""
    p = sub.add_parser(
        "train",
        help="run one training stage from a recipe (re-running the command resumes)",
        description="Train one stage. Overrides are dotted keys, e.g. train.max_steps=20 checkpoint.every=10 "
        "data_root=DIR model.init=DIR teacher=DIR; max_steps=N is short for train.max_steps=N.",
    )
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/shapes/micro/stage1_warmup.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    p.add_argument("--output", help="run directory (default: runs/<recipe folder>/<recipe name>)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (FSDP2 via torchrun)")
    p.set_defaults(func=_cmd_train)
