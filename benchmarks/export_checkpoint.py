"""Export a stage run's intermediate checkpoint as a model directory (for learning curves).

    python benchmarks/export_checkpoint.py RUN_DIR/checkpoints/step_00000500 OUT_DIR [--decoder DIR]

The run's own ``recipe.yaml`` and ``run.json`` (its init) rebuild the model exactly as the trainer did;
the checkpoint's weights are loaded through the trainer's checkpoint code and the model is saved with
``save_pretrained`` (plus a copy of ``--decoder`` in ``OUT_DIR/decoder``), ready for ``orion eval`` or
``benchmarks/prompt_dependence.py``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from orion_mllm.train import checkpoint as ckpt
from orion_mllm.train.distributed import DistState
from orion_mllm.train.loop import param_groups
from orion_mllm.train.recipe import load_recipe
from orion_mllm.train.setup import apply_trainable, build_model, read_run_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--decoder", type=Path, default=None, help="decoder directory copied into OUT/decoder")
    args = ap.parse_args()
    run = args.checkpoint.parent.parent
    recipe = load_recipe(run / "recipe.yaml")
    info = read_run_info(run)
    if not info:
        raise SystemExit(f"{run}: no run.json")
    model = build_model(recipe, info["init"])
    apply_trainable(model, recipe)
    optimizer = torch.optim.AdamW(param_groups(model, recipe.optim.weight_decay), lr=recipe.optim.max_lr)
    ckpt.load_checkpoint(args.checkpoint, model, optimizer, DistState(0, 0, 1, torch.device("cpu")))
    model.save_pretrained(args.out)
    if args.decoder is not None:
        shutil.copytree(args.decoder, args.out / "decoder", dirs_exist_ok=True)
    print(args.out)


if __name__ == "__main__":
    main()
