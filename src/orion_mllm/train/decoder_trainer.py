"""Decoder training: ``orion train recipes/shapes/tiny/decoder.yaml`` (a ``stage: decoder`` recipe).

Each step reads its slice of the data mixture (the last image of every record: a generation
target, an edit result, or an understanding input), renders it at the generation resolution,
encodes it with the *frozen* vision tower of the encoder model (the base VLM: the same tokens ORION
regresses), and trains the decoder to reconstruct the image from those tokens by flow matching
(``decoder/flow.py``). It runs on the stage trainer's skeleton (``train/loop.py``): the run directory
layout, the mixture sampler, bad-record skipping, AdamW + schedule, the anomaly guard, DCP checkpoints
with auto-resume, ``metrics.jsonl`` and TensorBoard; ``RUN/final`` is the decoder (EMA weights when
enabled). The decoder package itself holds only the network, the sampler, the coarse fit and conversion.

One process (the decoder is small next to the LLM); multi-process decoder training is not built.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from orion_mllm.data.records import parse_conversation
from orion_mllm.data.sources import DataError
from orion_mllm.decoder.coarse import CoarseFit
from orion_mllm.decoder.flow import flow_matching_loss
from orion_mllm.decoder.model import DECODER_CONFIG, NETWORK_WEIGHTS, OrionDecoder, decoder_preset
from orion_mllm.images import ImageLoadError, load_image, resize_for_generation
from orion_mllm.model.backbone import build_backbone, encode_images, load_backbone
from orion_mllm.sequence import ConversationError, ImagePart
from orion_mllm.train import checkpoint as ckpt
from orion_mllm.train.batches import BadSample, open_mixture
from orion_mllm.train.distributed import init_distributed
from orion_mllm.train.loop import RunLoop, param_groups
from orion_mllm.train.recipe import DecoderRecipe
from orion_mllm.train.setup import FINAL_MODEL, SetupError, read_run_info, recipe_image_spec


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


def config_changes(saved: dict[str, Any], built: dict[str, Any]) -> list[str]:
    """Keys (``extra.NAME`` inside ``extra``) where two decoder configs differ, except ``extra.encoder``:
    where the encoder was when a network was trained does not change it (its caller checks the encoder)."""

    def flat(config: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in config.items() if k != "extra"}
        out.update({f"extra.{k}": v for k, v in config.get("extra", {}).items() if k != "encoder"})
        return out

    a, b = flat(saved), flat(built)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


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


class DecoderTrainer(RunLoop):
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

    def _run_fields(self, old: dict[str, Any] | None) -> dict[str, Any]:
        return {"encoder": old["encoder"] if old else resolve_encoder(self.recipe, self.run_dir)}

    def _images(self, sources, picks) -> tuple[list, list[BadSample]]:
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
                bad.append(BadSample(where, f"{type(err).__name__}: {err}"))
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

    def _build_decoder(self, encoder_path: str) -> OrionDecoder:
        """The recipe's decoder (seeded initialisation) for ``encoder_path``'s tokens, its coarse map not
        yet fitted; sets ``self.encoder``."""
        r, d = self.recipe, self.dist
        torch.manual_seed(r.train.seed)
        self.encoder = TokenEncoder(encoder_path, r, d.device)
        spec = self.encoder.spec
        cfg = decoder_preset(
            r.decoder.preset, token_dim=self.encoder.token_dim, num_tokens=spec.gen_num_tokens,
            image_size=spec.gen_image_size,
        )  # fmt: skip
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
        return OrionDecoder(cfg).to(d.device)

    def run_from_network(self, network_dir: Path) -> Path:
        """Finish this run without training: the diffusion network comes from ``network_dir`` (its
        ``decoder_config.json`` and the weights ``OrionDecoder.save_network`` wrote to
        ``network.safetensors``; e.g. a committed decoder, trained by this recipe on the same encoder) and
        only the coarse map is fitted, exactly as :meth:`run` fits it before its first step. The coarse
        map never changes in training (nor its EMA copy), so the result is the trained decoder up to the
        fit's arithmetic. A network whose config differs from the one this recipe builds is refused,
        naming the keys."""
        info = self._prepare_run_dir()
        if info.get("status") == "finished":
            self._log(f"{self.run_dir} already finished: nothing to do")
            return self.run_dir / FINAL_MODEL
        decoder = self._build_decoder(info["encoder"])
        cfg_file = Path(network_dir) / DECODER_CONFIG
        try:
            saved = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SetupError(f"{cfg_file}: unreadable ({err})") from None
        changed = config_changes(saved, decoder.config.to_dict())
        if changed:
            raise SetupError(
                f"{cfg_file}: built otherwise than this recipe's decoder "
                f"(differs at {', '.join(changed[:4])})"
            )
        decoder.load_network(Path(network_dir) / NETWORK_WEIGHTS)
        if decoder.config.coarse_rank:
            self._fit_coarse(decoder, *open_mixture(self.recipe))
        final = self.run_dir / FINAL_MODEL
        decoder.eval().save_pretrained(final)
        self._mark_finished(info, 0, network=str(Path(network_dir).resolve()))
        self._log(f"exported {final} (network from {network_dir}, coarse map fitted here)")
        return final

    def run(self) -> Path:
        r = self.recipe
        info = self._prepare_run_dir()
        if info.get("status") == "finished":
            self._log(f"{self.run_dir} already finished: nothing to do")
            return self.run_dir / FINAL_MODEL
        decoder = self._build_decoder(info["encoder"])
        cfg = decoder.config
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
        total = self.total_steps(sampler)
        scheduler, guard = self._schedule(optimizer, total)
        counters = {"skipped_samples": 0, "seen_samples": 0}
        start = self._resume(state, optimizer, sampler, scheduler, guard, counters, total)
        self._log(
            f"decoder ({r.decoder.preset}, {sum(p.numel() for p in trainable):,} parameters, "
            f"{cfg.grid * cfg.grid} patches + {cfg.num_tokens} tokens): {total} steps of {g} images"
        )

        # The flow-matching noise/time draws of step s come from (seed, s): resume-exact.
        def step_fn(step: int, lr: float, t0: float) -> dict[str, Any]:
            images, bad = self._images(sources, sampler.take(step * g, g))
            counters["skipped_samples"] += len(bad)
            counters["seen_samples"] += len(bad) + len(images)
            self._record_bad(step, bad)
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
            seconds = max(time.time() - t0, 1e-9)
            return {
                "step": step, "loss": loss_value, "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
                "samples": len(images), "tokens_per_s": len(images) * cfg.grid**2 / seconds,
                "images_per_s": len(images) / seconds, "padding_share": 0.0,
                "skipped_steps": guard.skipped, "skipped_samples": counters["skipped_samples"],
                "ce": None, "mse": loss_value, "kl": None,
            }  # fmt: skip

        last = self._run_steps(
            step_fn, module=state, optimizer=optimizer, scheduler=scheduler, guard=guard, sampler=sampler,
            counters=counters, start=start, total=total, description="decoder",
        )  # fmt: skip
        final = self.run_dir / FINAL_MODEL
        (state["ema"].module if "ema" in state else decoder).save_pretrained(final)
        self._mark_finished(info, total, last=self._last_record(last))
        self._log(f"exported {final}")
        return final
