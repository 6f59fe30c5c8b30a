"""Decoder training: ``orion train recipes/shapes/tiny/decoder.yaml`` (a ``stage: decoder`` recipe).

Each step reads its slice of the data mixture (the last image of every record: a generation
target, an edit result, or an understanding input), renders it at the generation resolution,
encodes it with the *frozen* vision tower of the encoder model (the base VLM: the same tokens ORION
regresses), and trains the decoder to reconstruct the image from those tokens by flow matching
(``decoder/flow.py``). It shares the training engine's parts: the mixture sampler, bad-record
skipping, AdamW + schedule, the anomaly guard, DCP checkpoints with auto-resume, ``metrics.jsonl``,
TensorBoard and the run directory layout; ``RUN/final`` is the decoder (EMA weights when enabled).
It lives beside the stage trainer: the decoder package holds only the network, the sampler, the
coarse fit and conversion.

One process (the decoder is small next to the LLM); multi-process decoder training is not built.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from orion_mllm.data.sources import DataError
from orion_mllm.decoder.coarse import CoarseFit
from orion_mllm.decoder.flow import flow_matching_loss
from orion_mllm.decoder.model import OrionDecoder, decoder_preset
from orion_mllm.images import ImageLoadError, load_image, resize_for_generation
from orion_mllm.model.backbone import build_backbone, encode_images, load_backbone
from orion_mllm.sequence import ConversationError, ImagePart, parse_conversation
from orion_mllm.train import checkpoint as ckpt
from orion_mllm.train.anomaly import AnomalyGuard
from orion_mllm.train.batches import open_mixture
from orion_mllm.train.distributed import init_distributed
from orion_mllm.train.metrics import MetricsLogger, read_metrics
from orion_mllm.train.recipe import DecoderRecipe, recipe_to_yaml
from orion_mllm.train.schedule import LRSchedule, build_scheduler
from orion_mllm.train.setup import (
    FINAL_MODEL,
    SetupError,
    ensure_shapes_data,
    read_run_info,
    recipe_image_spec,
    write_run_info,
)
from orion_mllm.train.trainer import param_groups

BAD_SAMPLES_LOG = "skipped_samples.jsonl"


def resolve_encoder(recipe: DecoderRecipe, run_dir: Path) -> str:
    """``preset:NAME`` or an absolute model directory whose vision tower makes the tokens."""
    enc = recipe.encoder
    if enc.startswith("preset:"):
        return enc
    if enc == "previous":
        parent = run_dir.parent
        found = []
        for d in sorted(parent.iterdir()) if parent.is_dir() else []:
            info = read_run_info(d) if d.is_dir() and d != run_dir else None
            if info and info.get("stage") == "base" and info.get("status") == "finished":
                found.append(d / FINAL_MODEL)
        if len(found) != 1:
            raise SetupError(
                f"encoder=previous: expected one finished stage-0 (base) run next to {run_dir}, found "
                f"{len(found)}; run it first or set encoder=DIR"
            )
        return str(found[0].resolve())
    path = Path(enc).expanduser()
    if not (path / "config.json").is_file():
        raise SetupError(f"encoder={enc!r}: not a model directory (no config.json)")
    return str(path.resolve())


class TokenEncoder:
    """The frozen vision tower + merger of a Qwen2.5-VL model, as images -> [B, N, d] tokens."""

    def __init__(self, encoder: str, recipe: DecoderRecipe, device: torch.device) -> None:
        if encoder.startswith("preset:"):
            from orion_mllm.config import get_preset

            backbone, processor = build_backbone(get_preset(encoder.removeprefix("preset:")), seed=0)
        else:
            backbone, processor = load_backbone(encoder)
        backbone.model.language_model = None  # only the vision tower is needed
        backbone.lm_head = None
        self.backbone = backbone.to(device).eval().requires_grad_(False)
        self.image_processor = processor.image_processor
        self.spec = recipe_image_spec(recipe, processor)
        self.token_dim = int(backbone.config.text_config.hidden_size)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        out = self.image_processor(images=images, return_tensors="pt")
        tokens = encode_images(
            self.backbone, out["pixel_values"].to(self.device), out["image_grid_thw"].to(self.device)
        )
        return tokens.view(len(images), self.spec.gen_num_tokens, self.token_dim).float()


def last_image(record: dict[str, Any], where: str):
    images = [p.image for m in parse_conversation(record, where) for p in m.parts if isinstance(p, ImagePart)]
    if not images:
        raise DataError(f"{where}: record has no image")
    return images[-1]


class DecoderTrainer:
    def __init__(
        self, recipe: DecoderRecipe, run_dir: str | Path, *, tensorboard: bool = True, callbacks=None
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir).resolve()
        self.tensorboard = tensorboard
        self.callbacks = list(callbacks or [])
        self.dist = init_distributed()
        if self.dist.distributed:
            raise SetupError("decoder training runs in one process (drop --nproc / torchrun)")

    def _images(self, sources, picks) -> tuple[list, list[dict[str, str]]]:
        images, bad = [], []
        for dataset, index in picks:
            src = sources[dataset]
            where = f"{src.name}[{index}]"
            try:
                raw = src.get(index)
                where = raw.source
                img = load_image(last_image(raw.record, where), where=where)
                images.append(resize_for_generation(img, self.encoder.spec))
            except (DataError, ConversationError, ImageLoadError, OSError) as err:
                bad.append({"source": where, "reason": f"{type(err).__name__}: {err}"})
        return images, bad

    def _pixels(self, images: list) -> torch.Tensor:
        arrays = [
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images
        ]
        return torch.stack(arrays).to(self.dist.device)

    @torch.no_grad()
    def _fit_coarse(self, decoder: OrionDecoder, sources, sampler) -> None:
        """Fit the decoder's coarse estimate on the first ``coarse_fit_images`` images of the mixture
        (the order training reads them in; unreadable records are skipped here too)."""
        n = self.recipe.decoder.coarse_fit_images
        fit = CoarseFit(decoder)
        batch = max(self.recipe.train.global_batch_size, 256)
        t0 = time.time()
        for start in tqdm(range(0, n, batch), desc="fitting coarse estimate", unit="batch", disable=None):
            images, _ = self._images(sources, sampler.take(start, min(batch, n - start)))
            if images:
                fit.update(self.encoder(images), decoder.encode_images(self._pixels(images)))
        stats = fit.solve(ridge=self.recipe.decoder.coarse_ridge)
        print(
            f"coarse estimate: rank {decoder.config.coarse_rank} fitted on {int(stats['images'])} images in "
            f"{time.time() - t0:.0f} s (train R^2 {stats['train_r2']:.3f})",
            flush=True,
        )

    def run(self):
        r, d = self.recipe, self.dist
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ensure_shapes_data(r, progress=os.isatty(2))
        old = read_run_info(self.run_dir)
        if old and old.get("status") == "finished" and (self.run_dir / FINAL_MODEL).is_dir():
            print(f"{self.run_dir} already finished: nothing to do", flush=True)
            return self.run_dir / FINAL_MODEL
        encoder_path = old["encoder"] if old else resolve_encoder(r, self.run_dir)
        (self.run_dir / "recipe.yaml").write_text(recipe_to_yaml(r))
        info = dict(old or {})
        info.update(stage="decoder", encoder=encoder_path, status="running", final_model=FINAL_MODEL)
        info.setdefault("started_at", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        write_run_info(self.run_dir, info)
        ckpt.remove_incomplete(self.run_dir)

        torch.manual_seed(r.train.seed)
        self.encoder = TokenEncoder(encoder_path, r, d.device)
        spec = self.encoder.spec
        cfg = decoder_preset(
            r.decoder.preset, token_dim=self.encoder.token_dim, num_tokens=spec.gen_num_tokens,
            image_size=spec.gen_image_size,
        )  # fmt: skip
        import dataclasses

        extra = {
            "encoder": encoder_path,
            "time_shift": r.decoder.time_shift,
            "sample_steps": r.decoder.sample_steps,
            "cfg_scale": r.decoder.cfg_scale,
        }
        overrides = {
            k: v
            for k, v in (("patch_size", r.decoder.patch_size), ("prediction", r.decoder.prediction),
                         ("spatial_cond", r.decoder.spatial_cond), ("coarse_rank", r.decoder.coarse_rank))
            if v is not None
        }  # fmt: skip
        cfg = dataclasses.replace(cfg, extra=extra, **overrides)
        decoder = OrionDecoder(cfg).to(d.device)
        decoder.train()
        sources, sampler = open_mixture(r)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if cfg.coarse_rank and latest is None:  # a resumed run loads the fitted map with its checkpoint
            self._fit_coarse(decoder, sources, sampler)
        state = nn.ModuleDict({"decoder": decoder})
        # After the fit: the EMA copy starts from the fitted coarse map (it is never trained).
        if r.decoder.ema_decay:
            state["ema"] = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(r.decoder.ema_decay))
        trainable = [p for p in decoder.parameters() if p.requires_grad]
        o = r.optim
        optimizer = torch.optim.AdamW(
            param_groups(decoder, o.weight_decay), lr=o.max_lr, betas=o.betas, eps=o.eps
        )
        g = r.train.global_batch_size
        total = max(1, math.ceil(r.train.epochs * sampler.samples_per_epoch / g))
        total = min(total, r.train.max_steps) if r.train.max_steps else total
        schedule = LRSchedule(o.max_lr, o.min_lr, o.scheduler, o.warmup_ratio, total)
        scheduler = build_scheduler(optimizer, schedule)
        guard = AnomalyGuard(**r.anomaly.model_dump())
        counters = {"skipped_samples": 0, "seen_samples": 0}
        start = 0
        if latest is not None:
            saved = ckpt.load_checkpoint(latest[1], state, optimizer, d)
            sampler.check_state(saved["sampler"])
            if saved["total_steps"] != total:
                raise ValueError(f"{latest[1]}: made for {saved['total_steps']} steps, this run has {total}")
            start = saved["step"]
            scheduler.load_state_dict(saved["scheduler"])
            guard.load_state_dict(saved["guard"])
            counters.update(saved["counters"])
            print(f"resumed from {latest[1]} (step {start}/{total})", flush=True)
        print(
            f"decoder ({r.decoder.preset}, {sum(p.numel() for p in trainable):,} parameters, "
            f"{cfg.grid * cfg.grid} patches + {cfg.num_tokens} tokens): {total} steps of {g} images",
            flush=True,
        )
        logger = MetricsLogger(
            self.run_dir, start_step=start, total_steps=total, log_every=r.train.log_every,
            tensorboard=self.tensorboard, description="decoder",
        )  # fmt: skip
        # The flow-matching noise/time draws of step s come from (seed, s): resume-exact.
        last: dict[str, Any] = {}
        try:
            for step in range(start, total):
                t0 = time.time()
                lr = optimizer.param_groups[0]["lr"]
                images, bad = self._images(sources, sampler.take(step * g, g))
                counters["skipped_samples"] += len(bad)
                counters["seen_samples"] += len(bad) + len(images)
                if bad:
                    with open(self.run_dir / BAD_SAMPLES_LOG, "a") as f:
                        for b in bad:
                            f.write(json.dumps({"step": step, **b}) + "\n")
                optimizer.zero_grad(set_to_none=True)
                loss_value, grad_norm, skipped = float("nan"), None, True
                if images:
                    tokens = self.encoder(images)
                    with torch.no_grad():
                        latents = decoder.encode_images(self._pixels(images))
                    gen = torch.Generator().manual_seed(r.train.seed * 1_000_003 + step)
                    loss = flow_matching_loss(
                        decoder, latents, tokens, cond_dropout=r.decoder.cond_dropout,
                        shift=r.decoder.time_shift, loss_space=r.decoder.loss_space, generator=gen,
                    )  # fmt: skip
                    loss.backward()
                    loss_value = float(loss.detach())
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip))
                    skipped = guard.check(loss_value, grad_norm, step=step)
                    if skipped:
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        optimizer.step()
                        if "ema" in state:
                            state["ema"].update_parameters(decoder)
                else:
                    guard.skipped += 1
                scheduler.step()
                seconds = max(time.time() - t0, 1e-9)
                record = {
                    "step": step, "loss": loss_value, "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
                    "samples": len(images), "tokens_per_s": len(images) * cfg.grid**2 / seconds,
                    "images_per_s": len(images) / seconds, "padding_share": 0.0,
                    "skipped_steps": guard.skipped, "skipped_samples": counters["skipped_samples"],
                    "ce": None, "mse": loss_value, "kl": None,
                }  # fmt: skip
                logger.log(record)
                last = record
                seen, nbad = counters["seen_samples"], counters["skipped_samples"]
                if seen >= 50 and nbad > r.train.max_bad_sample_share * seen:
                    raise DataError(
                        f"{nbad} of {seen} images could not be read (> train.max_bad_sample_share="
                        f"{r.train.max_bad_sample_share:g}); see {self.run_dir / BAD_SAMPLES_LOG}"
                    )
                if (step + 1) % r.checkpoint.every == 0 or step + 1 == total:
                    saved_state = {
                        "step": step + 1, "total_steps": total, "sampler": sampler.state_dict(),
                        "scheduler": scheduler.state_dict(), "guard": guard.state_dict(),
                        "counters": counters,
                    }  # fmt: skip
                    ckpt.save_checkpoint(
                        self.run_dir, step + 1, state, optimizer, saved_state, d, keep=r.checkpoint.keep
                    )
                for cb in self.callbacks:
                    cb(self, step, record)
        finally:
            logger.close()
        final_model = state["ema"].module if "ema" in state else decoder
        final = self.run_dir / FINAL_MODEL
        final_model.save_pretrained(final)
        info = read_run_info(self.run_dir) or info
        done = read_metrics(self.run_dir)
        info.update(
            status="finished", steps=total, last=last or (done[-1] if done else {}),
            finished_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )  # fmt: skip
        write_run_info(self.run_dir, info)
        print(f"exported {final}", flush=True)
        return final
