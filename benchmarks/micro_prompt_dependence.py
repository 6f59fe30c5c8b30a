"""Does a micro model trained a few hundred steps draw *different* pictures for different prompts?

    python benchmarks/micro_prompt_dependence.py OUT_DIR [--steps 300] [--old-recipe]

Trains the micro preset on text-to-image ShapesWorld data only (from random weights whose tower is
standardised as stage 0 does it, KL off) with the generation settings the tiny recipes ship (MSE in
units of the targets' variance, caption dropout, per-image noisy context, LR 1e-3); ``--old-recipe``
uses the settings the project shipped before issue 16 (MSE weight 1 on raw tokens, fixed noise 0.1,
LR 5e-4) for contrast.
Then regresses the tokens of 16 distinct training captions free-running and compares their spread
across prompts with the targets' own spread. The mean-image failure has a ratio near 0.

Prints one JSON object last. ``tests/test_guidance.py`` runs ``train_and_measure`` as a CI check.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from orion_mllm.data.records import encode_record
from orion_mllm.data.shapes.datasets import write_shapes_dataset
from orion_mllm.eval.model_eval import read_jsonl, regress_tokens
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.sequence import attach_visual_tokens
from orion_mllm.train.recipe import parse_recipe
from orion_mllm.train.trainer import Trainer

NEW = {"mse_normalize": True, "prompt_dropout": 0.1, "visual_input_noise": 0.3,
       "visual_input_noise_schedule": "uniform"}  # fmt: skip
OLD = {"mse_normalize": False, "prompt_dropout": 0.0, "visual_input_noise": 0.1,
       "visual_input_noise_schedule": "fixed"}  # fmt: skip


def _gen_data(data_root: Path) -> dict[str, Any]:
    """What both recipes share: the micro resolutions and the text-to-image data alone."""
    return {
        "resolution": {"gen_min_long_side": 48, "gen_max_long_side": 48, "und_min_long_side": 32,
                       "und_max_long_side": 96},
        "data_root": str(data_root),
        "data": [{"name": "gen", "path": "gen.jsonl", "task": "generation", "weight": 1.0}],
        "checkpoint": {"every": 100000, "keep": 1},
    }  # fmt: skip


def micro_base_recipe(data_root: Path) -> Any:
    """One stage-0 step: the micro preset with its random tower standardised (tokens of std 0.1)."""
    return parse_recipe({
        "stage": "base",
        "model": {"init": "preset:micro", "head": "mlp", "dtype": "float32",
                  "standardize_tokens_images": 256},
        "trainable": {"vision_tower": False, "llm": True, "head": False},
        "loss": {"ce": 1.0, "mse": 0.0, "kl": 0.0},
        "optim": {"max_lr": 1e-5, "min_lr": 1e-5, "scheduler": "constant", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-15, "grad_clip": 1.0},
        "train": {"epochs": 1, "max_steps": 1, "global_batch_size": 4, "micro_batch_size": 4, "seed": 0},
        **_gen_data(data_root),
    })  # fmt: skip


def micro_gen_recipe(data_root: Path, base: Path, steps: int, old: bool = False) -> Any:
    return parse_recipe({
        "stage": "pretrain",
        "model": {"init": str(base), "head": "mlp", "mlp_ratio": 8, "dtype": "float32"},
        "teacher": str(base),
        "trainable": {"vision_tower": False, "llm": True, "head": True},
        "loss": {"ce": 1.0, "mse": 1.0, "kl": 0.0},
        "optim": {"max_lr": 5e-4 if old else 1e-3, "min_lr": 0.0, "scheduler": "cosine",
                  "warmup_ratio": 0.05, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-15,
                  "grad_clip": 1.0},
        "train": {"epochs": 100, "max_steps": steps, "global_batch_size": 16, "micro_batch_size": 16,
                  "seed": 0, "packing": True, "pack_tokens": 512, "log_every": 50, **(OLD if old else NEW)},
        **_gen_data(data_root),
    })  # fmt: skip


def prompt_spread(model_dir: Path, data_root: Path, n: int = 16) -> dict[str, float]:
    """Free-running tokens of ``n`` distinct training captions: their spread across prompts vs the
    targets' spread (per position and dimension), and how often the nearest target is the own one."""
    pipe = OrionPipeline.load(model_dir, image_separator="\n", device="cpu", dtype="fp32")
    records, seen = [], set()
    for r in read_jsonl(data_root / "gen.jsonl"):
        if r["caption"] not in seen:
            seen.add(r["caption"])
            records.append({**r, "image": str(data_root / r["image"])})
        if len(records) == n:
            break
    builder = pipe.model.sequence_builder()
    with torch.no_grad():
        true = torch.stack([
            attach_visual_tokens(encode_record(builder, r), pipe.model.encode_images).visual_tokens.float()
            for r in records
        ])  # fmt: skip
    free = torch.stack(regress_tokens(pipe, [r["conversations"][0]["value"] for r in records],
                                      progress=False, guidance=1.0)).float()  # fmt: skip
    cross = ((free[:, None] - true[None]) ** 2).mean((2, 3))
    return {
        "free_spread": free.var(0).mean().item(),
        "target_spread": true.var(0).mean().item(),
        "spread_ratio": (free.var(0).mean() / true.var(0).mean()).item(),
        "nearest_is_own": (cross.argmin(1) == torch.arange(len(records))).float().mean().item(),
    }


def train_and_measure(out: Path, steps: int = 300, old: bool = False) -> dict[str, Any]:
    data = out / "data"
    if not (data / "meta.json").is_file():
        write_shapes_dataset(data, size=48, n_und=0, n_gen=400, n_edit=0, n_interleaved=0, n_heldout=0,
                             progress=False)  # fmt: skip
    base = Trainer(micro_base_recipe(data), out / "base", tensorboard=False).run().final_model
    t0 = time.time()
    run = out / ("old" if old else "new")
    result = Trainer(micro_gen_recipe(data, base, steps, old), run, tensorboard=False).run()
    return {"steps": steps, "old_recipe": old, "train_s": round(time.time() - t0, 1),
            **prompt_spread(result.final_model, data)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--old-recipe", action="store_true")
    args = ap.parse_args()
    print(json.dumps(train_and_measure(args.out, args.steps, args.old_recipe)))


if __name__ == "__main__":
    main()
