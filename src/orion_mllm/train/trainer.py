"""The ORION trainer: one recipe (one stage) from its start weights to an exported model.

Run it with ``orion train RECIPE.yaml [--output DIR] [key=value ...]`` (one process) or
``torchrun --nproc_per_node N -m orion_mllm.cli train ...`` (FSDP2; gloo on CPU, NCCL on GPU).
Re-running the same command resumes from the newest complete checkpoint in DIR.

Each optimizer step:
1. reads its slice of the data mixture (``batches.py``), skipping and counting bad records;
2. runs the micro-batches (packed rows) through student and teacher, each term normalised by the
   step's *global* number of targets, so the result does not depend on how samples were split
   into micro-batches or over ranks (1 process == N processes for the same global batch);
3. clips the gradient norm, asks the anomaly guard whether to skip the step (NaN/Inf loss or
   gradient, or a norm spike vs its running median), steps AdamW (2-3: ``step.train_step``, which
   weighs the terms with ``losses.step_loss``) and the LR schedule;
4. logs a metrics line; saves a checkpoint every ``checkpoint.every`` steps and at the end.
At the end the model is exported in the Hugging Face layout to ``RUN/final``. The run skeleton (run
directory, resume, the step loop, checkpoints, bad-sample log) is ``loop.RunLoop``, shared with the
decoder trainer; this module supplies the stage's setup, step, drift probe and export.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from orion_mllm.data.entries import DatasetEntry
from orion_mllm.data.sources import open_dataset
from orion_mllm.losses import LossWeights
from orion_mllm.model.backbone import save_processor
from orion_mllm.model.orion import OrionModel
from orion_mllm.model.teacher import load_teacher
from orion_mllm.sequence import Batch
from orion_mllm.train import checkpoint as ckpt
from orion_mllm.train.batches import (
    Prefetcher,
    StepLoader,
    open_mixture,
    text_targets,
    visual_targets,
)
from orion_mllm.train.distributed import (
    DistState,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    init_distributed,
    parallelize,
)
from orion_mllm.train.drift_probe import probe_batches
from orion_mllm.train.loop import RunLoop, param_groups
from orion_mllm.train.recipe import Recipe
from orion_mllm.train.setup import (
    FINAL_MODEL,
    apply_trainable,
    build_model,
    ensure_shapes_data,
    pretrain_tower_for_recipe,
    read_run_info,
    resolve_init,
    resolve_teacher,
    standardize_tower,
)
from orion_mllm.train.step import train_step
from orion_mllm.train.token_stats import target_token_variance

DRIFT_WEIGHTS = LossWeights(ce=0.0, mse=0.0, kl=1.0)
StepCallback = Callable[["Trainer", int, dict[str, Any]], None]

# Recipe keys that may change between a run and its resume: they change how the run is watched,
# checkpointed or batched, not what it computes (losses are normalised per global step, so the
# micro-batch split does not matter). Anything else changed on resume is refused.
RESUMABLE_CHANGES = (
    "description", "checkpoint.", "anomaly.", "drift.", "data_root", "shapes_data", "train.log_every",
    "train.max_bad_sample_share", "train.max_steps", "train.micro_batch_size", "train.packing",
    "train.pack_tokens", "train.activation_checkpointing", "model.attn_implementation",
)  # fmt: skip


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        # Lists of sections (the data entries) by position, so that a key added to an entry's schema
        # later (e.g. ``data.0.qtypes``) counts as its default like any other new key.
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


def recipe_changes(
    saved: dict[str, Any], current: dict[str, Any], schema: type[BaseModel] | None = None,
    ignore: tuple[str, ...] = RESUMABLE_CHANGES,
) -> list[str]:  # fmt: skip
    """Keys whose values differ between two recipes (as dicts), except those in ``ignore`` (by default
    the ones a resume may change).

    With ``schema`` (the recipe class), a key the saved recipe lacks because it was added to the
    schema after the run started counts as its default: new recipe keys default to the behaviour runs
    had before them, so a run resumed with the default has not changed."""
    a, b = _flatten(saved), _flatten(current)
    if schema is not None:
        try:
            filled = _flatten(schema.model_validate(saved).model_dump(mode="json"))
        except ValidationError:  # a recipe today's schema refuses: compared as it was saved
            filled = {}
        a.update({k: v for k, v in filled.items() if k not in a})
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == p or k.startswith(p) for p in ignore)]


@dataclass
class TrainResult:
    run_dir: Path
    final_model: Path
    steps: int
    skipped_steps: int
    skipped_samples: int
    last_metrics: dict[str, Any]


def default_output_dir(recipe_path: str | Path) -> Path:
    """``recipes/shapes/micro/stage1_warmup.yaml`` -> ``runs/shapes-micro/stage1_warmup``."""
    p = Path(recipe_path).resolve()
    group = p.parent.name
    if p.parent.parent.name not in ("recipes", ""):
        group = f"{p.parent.parent.name}-{group}"
    return Path("runs") / group / p.stem


def preflight(recipe: Recipe, run_dir: str | Path) -> None:
    """Configuration checks worth doing before spawning processes: data, init model, teacher.

    Each raises a one-line error naming what is wrong; ``orion train --nproc N`` runs this in the
    launching process so a bad path is reported once instead of by every rank.
    """
    run_dir = Path(run_dir).resolve()
    ensure_shapes_data(recipe, progress=os.isatty(2))
    old = read_run_info(run_dir)
    if old is None:
        init = resolve_init(recipe, run_dir)
        resolve_teacher(recipe, init)
    open_mixture(recipe)


class Trainer(RunLoop):
    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        recipe_path: str | None = None,
        callbacks: list[StepCallback] | None = None,
        device: str | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir).resolve()
        self.recipe_path = recipe_path
        self.callbacks = list(callbacks or [])
        self.dist: DistState = init_distributed(device)
        self.tensorboard = tensorboard
        self.weights: LossWeights = recipe.loss

    # ------------------------------------------------------------------ setup (RunLoop hooks)

    def _run_fields(self, old: dict[str, Any] | None) -> dict[str, Any]:
        init = old["init"] if old else resolve_init(self.recipe, self.run_dir)
        teacher = old["teacher"] if old else resolve_teacher(self.recipe, init)
        return {
            "recipe": self.recipe_path,
            "init": init,
            "teacher": teacher,
            "world_size": self.dist.world_size,
        }

    def _check_resume(self, state: dict[str, Any]) -> None:
        saved = state.get("recipe", {})
        changed = recipe_changes(saved, self.recipe.model_dump(mode="json"), type(self.recipe))
        if changed:
            raise ValueError(
                f"{self.run_dir} was started with a different recipe ({', '.join(changed)} changed); "
                "resume with the original values or train into a new --output"
            )

    def _trainer_state(self, step, total, sampler, scheduler, guard, counters) -> dict[str, Any]:
        # The recipe travels with the checkpoint (a resume refuses a changed one, _check_resume).
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            **super()._trainer_state(step, total, sampler, scheduler, guard, counters),
            "data_position": step * self.recipe.train.global_batch_size,
        }

    # ------------------------------------------------------------------ run

    def run(self) -> TrainResult:
        r, d = self.recipe, self.dist
        torch.manual_seed(r.train.seed)
        info = self._prepare_run_dir()
        if info.get("status") == "finished":
            self._log(f"{self.run_dir} already finished ({info.get('steps')} steps): nothing to do")
            last = self._last_record({})
            return TrainResult(
                self.run_dir,
                self.run_dir / FINAL_MODEL,
                int(info.get("steps", 0)),
                int(last.get("skipped_steps", 0)),
                int(last.get("skipped_samples", 0)),
                last,
            )
        model = build_model(r, info["init"])
        if r.model.tower_pretrain is not None and ckpt.latest_checkpoint(self.run_dir) is None:
            # A resume loads the pre-trained tower from its checkpoint: no need to train it again.
            done = pretrain_tower_for_recipe(model, r, log=self._log)
            place = "" if done.position_accuracy is None else f" place {done.position_accuracy:.3f}"
            self._log(
                f"tower pre-trained: {done.steps} steps in {done.seconds:.0f} s, token read-out accuracy "
                f"colour {done.colour_accuracy:.3f} shape {done.shape_accuracy:.3f}{place}, "
                f"pixel MSE {done.recon_mse:.4f}"
            )
        standardize_tower(model, r)
        apply_trainable(model, r)
        model.train()
        builder = model.sequence_builder()
        pad_id = model.processor.tokenizer.pad_token_id
        use_cuda = d.device.type == "cuda"
        bf16 = use_cuda and r.model.dtype == "bfloat16"
        # The drift probe compares the model with the KL teacher (the base), so it needs one even
        # when the KL term is off (the KL-off ablation is where drift is largest).
        probe = self._drift_probe(model)
        teacher = None
        if self.weights.kl > 0 or probe is not None:
            teacher = load_teacher(
                info["teacher"],
                seed=r.train.seed,
                attn_implementation=r.model.attn_implementation,
                dtype=torch.bfloat16 if bf16 else torch.float32,
            )
            teacher.to(d.device)
        if r.train.mse_normalize and self.weights.mse > 0:
            self._normalize_mse(model, pad_id)  # before parallelize: it runs the tower on its own
        model.to(d.device)
        parallelize(model, teacher, d, activation_checkpointing=r.train.activation_checkpointing, bf16=bf16)

        o = r.optim
        optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.max_lr, betas=o.betas, eps=o.eps, foreach=True
        )
        sources, sampler = open_mixture(r)
        total = self.total_steps(sampler)
        scheduler, guard = self._schedule(optimizer, total)
        counters = {"skipped_samples": 0, "seen_samples": 0, "tokens": 0}
        start = self._resume(model, optimizer, sampler, scheduler, guard, counters, total)
        loader = StepLoader(
            sources,
            sampler,
            builder,
            global_batch_size=r.train.global_batch_size,
            rank=d.rank,
            world_size=d.world_size,
            packing=r.train.packing,
            pack_tokens=r.train.pack_tokens,
            micro_batch_size=r.train.micro_batch_size,
            pad_token_id=pad_id,
            prompt_dropout=r.train.prompt_dropout,
            seed=r.train.seed,
            regress_images=[entry.regress_images for entry in r.data],
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        self._log(
            f"stage {r.stage}: {total} steps of {r.train.global_batch_size} samples, "
            f"{d.world_size} process(es) "
            f"on {d.device.type}, {n_train:,} trainable parameters, run dir {self.run_dir}"
        )
        prefetch = Prefetcher(loader)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
        self.model, self.optimizer, self.teacher = model, optimizer, teacher

        def step_fn(step: int, lr: float, t0: float) -> dict[str, Any]:
            data = prefetch.get(step, step + 1 if step + 1 < total else None)
            record = self._train_step(step, data, model, teacher, optimizer, trainable, guard, autocast)
            counters["skipped_samples"] += record["skipped_samples_step"]
            counters["seen_samples"] += record["seen_samples_step"]
            counters["tokens"] += record["tokens"]
            self._record_bad(step, record.pop("bad"))
            if probe is not None and (step % r.drift.every == 0 or step + 1 == total):
                record["drift_kl"] = self._measure_drift(model, teacher, probe, autocast)
            record.update(
                lr=lr,
                tokens_per_s=record["tokens"] / max(time.time() - t0, 1e-9),
                skipped_steps=guard.skipped,
                skipped_samples=counters["skipped_samples"],
            )
            return record

        try:
            last = self._run_steps(
                step_fn, module=model, optimizer=optimizer, scheduler=scheduler, guard=guard,
                sampler=sampler, counters=counters, start=start, total=total, description=f"stage {r.stage}",
            )  # fmt: skip
        finally:
            prefetch.close()
        last = self._last_record(last)  # {} when killed after the last checkpoint, before the export
        final = self._export(model, info)
        self._mark_finished(info, total)
        self._log(f"exported {final}")
        barrier(d)
        return TrainResult(self.run_dir, final, total, guard.skipped, counters["skipped_samples"], last)

    # ------------------------------------------------------------------ drift probe

    def _drift_probe(self, model: OrionModel) -> list[Batch] | None:
        """Stages 2-3: a fixed batch of generation records (``drift`` section) for the drift KL."""
        r = self.recipe
        if r.stage not in ("pretrain", "sft") or r.drift.every == 0:
            return None
        if r.drift.path is not None:
            entry = DatasetEntry(name="drift_probe", path=r.drift.path, task="generation", weight=1.0)
        else:
            entry = next((e for e in r.data if e.task == "generation" and e.format == "conversations"), None)
            if entry is None:
                self._log("drift probe off: no generation entry in conversations format (set drift.path)")
                return None
        source = open_dataset(entry, r.data_root)
        records = [source.get(i).record for i in range(min(r.drift.samples, len(source)))]
        batches = probe_batches(model, records)
        if not batches:  # e.g. ShapesWorld data written with n_heldout: 0
            self._log(f"drift probe off: {source!r} holds no generated images to probe")
            return None
        return batches

    def _measure_drift(self, model, teacher, probe: list[Batch], autocast) -> float:
        """KL(base || model) of the text head at the probe's visual positions (the KL term itself, run
        through the model's own forward so that FSDP-sharded models need nothing special)."""
        total, positions = 0.0, 0
        with torch.no_grad(), autocast():
            for batch in probe:
                out = model(batch.to(self.dist.device), DRIFT_WEIGHTS, teacher)
                total += float(out.terms.kl) * out.num_visual_targets
                positions += out.num_visual_targets
        return total / max(positions, 1)

    def _normalize_mse(self, model: OrionModel, pad_id: int) -> None:
        """``train.mse_normalize``: the MSE weight divided by the targets' per-dimension variance."""
        r = self.recipe
        sources, sampler = open_mixture(r)
        loader = StepLoader(
            sources, sampler, model.sequence_builder(), global_batch_size=r.train.global_batch_size,
            rank=self.dist.rank, world_size=self.dist.world_size, packing=r.train.packing,
            pack_tokens=r.train.pack_tokens, micro_batch_size=r.train.micro_batch_size, pad_token_id=pad_id,
            regress_images=[entry.regress_images for entry in r.data],
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the measurement must not move the training RNG
            var, images = target_token_variance(model, loader, self.dist)
        self.weights = dataclasses.replace(self.weights, mse=r.loss.mse / var)
        self._log(
            f"MSE in units of the targets' variance: {var:.4g} per dimension over {images} generated "
            f"images -> effective MSE weight {self.weights.mse:.4g}"
        )

    # ------------------------------------------------------------------ one step

    def _train_step(
        self, step, data, model, teacher, optimizer, trainable, guard, autocast
    ) -> dict[str, Any]:
        d = self.dist
        local_text = sum(text_targets(b) for b in data.micro_batches)
        local_vis = sum(visual_targets(b) for b in data.micro_batches)
        n_text, n_vis, tokens, slots, good, bad = all_reduce_sum(
            [local_text, local_vis, data.real_tokens, data.slots, data.good, len(data.bad)], d
        )
        n_micro = all_reduce_max(len(data.micro_batches), d)
        packed = self.recipe.train.packing
        (n_rows,) = all_reduce_sum([len(data.micro_batches)], d)
        bad_all = self._gather_bad(data.bad)
        record: dict[str, Any] = {
            "step": step,
            "samples": int(good),
            "tokens": int(tokens),
            "padding_share": 1.0 - tokens / slots if slots else 0.0,
            # Packed rows are not padded; this is how full the rows' token budgets are.
            "pack_fill": tokens / (n_rows * self.recipe.train.pack_tokens) if packed and n_rows else None,
            "skipped_samples_step": int(bad),
            "seen_samples_step": int(good + bad),
            "bad": bad_all,
        }
        if good == 0:  # nothing readable in the whole global batch: nothing to learn from
            guard.skipped += 1
            record.update(loss=float("nan"), ce=None, mse=None, kl=None, grad_norm=None, skipped=True)
            return record
        if not data.micro_batches:
            raise RuntimeError(
                f"rank {d.rank} got no readable sample at step {step} while others did; "
                "raise train.global_batch_size or fix the data"
            )
        result = train_step(
            model,
            teacher,
            data.micro_batches,
            optimizer,
            trainable,
            self.weights,
            dist=d,
            step_text=n_text,
            step_visual=n_vis,
            n_micro=n_micro,
            autocast=autocast,
            grad_clip=self.recipe.optim.grad_clip,
            guard=guard,
            step=step,
            visual_input_noise=self.recipe.train.visual_input_noise,
            noise_schedule=self.recipe.train.visual_input_noise_schedule,
            ce_weighting=self.recipe.train.ce_weighting,
        )
        record.update(result)
        return record

    # ------------------------------------------------------------------ export

    def _export(self, model: OrionModel, info: dict[str, Any]) -> Path:
        """Write ``RUN/final``: an ORION model, or for stage base a plain Qwen2.5-VL directory."""
        d = self.dist
        final = self.run_dir / FINAL_MODEL
        if d.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if d.is_main:
                # A fresh single-device copy of the same architecture takes the gathered weights.
                plain = build_model(self.recipe, info["init"])
                plain.load_state_dict(_strip_wrappers(full), strict=True)
                self._save(plain, final)
        elif d.is_main:
            if self.recipe.train.activation_checkpointing:
                plain = build_model(self.recipe, info["init"])
                plain.load_state_dict(_strip_wrappers(model.state_dict()), strict=True)
                model = plain
            self._save(model, final)
        barrier(d)
        return final

    def _save(self, model: OrionModel, final: Path) -> None:
        if self.recipe.stage == "base":
            import shutil

            tmp = final.parent / f".{final.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.backbone.save_pretrained(tmp, safe_serialization=True)
            save_processor(model.processor, tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        else:
            # The token-space guidance the model is used with by default (recipe ``guidance``), and where
            # its understanding data put the picture (ShapesWorld's ``question_first``; other data: as
            # the model it started from).
            shapes = self.recipe.shapes_data
            question_first = shapes.question_first if shapes is not None else model.config.question_first
            model.config = dataclasses.replace(
                model.config, guidance=self.recipe.guidance, question_first=question_first
            )
            model.save_pretrained(final)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop activation-checkpoint wrapper prefixes from parameter names."""
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}
