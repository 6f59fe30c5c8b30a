"""Fast decoder design sweep: train for a fixed wall-clock budget on cached tokens, then score.

    python benchmarks/decoder_sweep.py --budget 300 --prediction sample --spatial-cond 64 --patch 8

Unlike ``decoder_recon.py`` (the acceptance benchmark, which goes through ``orion train``), this
script encodes a ShapesWorld generation set once with the random-init ``tiny`` vision tower, caches
the tokens, and trains ``OrionDecoder`` in a bare loop, so design choices (patch size, velocity vs
clean-sample prediction, per-patch conditioning, learning rate) can be compared in minutes. It also
fits a ridge regression from tokens to pixels as a reference for how much the tokens carry. Scoring:
held-out images reconstructed from their tokens, judged by ``scene_matches`` (objects, colours,
counts, positions) and PSNR. Last line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from orion_mllm.data.shapes.datasets import write_shapes_dataset  # noqa: E402
from orion_mllm.decoder.coarse import CoarseFit  # noqa: E402
from orion_mllm.decoder.flow import flow_matching_loss, sample  # noqa: E402
from orion_mllm.decoder.model import OrionDecoder, decoder_preset  # noqa: E402
from orion_mllm.eval.shapes_und_edit import scene_matches  # noqa: E402
from orion_mllm.images import resize_for_generation  # noqa: E402
from orion_mllm.model.orion import OrionModel  # noqa: E402


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.asarray(x, dtype=np.float32) / 255).permute(2, 0, 1) for x in images]
    )


def _score(images: torch.Tensor, targets: torch.Tensor, records: list[dict]) -> tuple[float, float]:
    ok, psnr = 0, []
    for img, tgt, rec in zip(images, targets, records, strict=True):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        ok += scene_matches(Image.fromarray(arr), rec["scene"])
        psnr.append(float(10 * torch.log10(1 / ((img - tgt) ** 2).mean().clamp(min=1e-10))))
    return ok / len(records), float(np.mean(psnr))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/decoder-sweep/data")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--budget", type=float, default=300, help="training seconds")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--prediction", default="sample", choices=["velocity", "sample"])
    ap.add_argument("--spatial-cond", type=int, default=64)
    ap.add_argument("--loss-space", default="velocity", choices=["velocity", "sample"])
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    ap.add_argument("--coarse-rank", type=int, default=0, help="fitted coarse estimate's rank (0: off)")
    ap.add_argument("--width", type=int, default=0, help="attention heads x 32 (0: the preset's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.data)
    if not (root / "meta.json").is_file():
        write_shapes_dataset(root, size=64, n_und=0, n_gen=args.n_train, n_edit=0, n_interleaved=0,
                             n_heldout=100, progress=False)  # fmt: skip
    model = OrionModel.from_preset("tiny")
    spec, ip = model.config.image_spec, model.processor.image_processor

    def load(name: str) -> tuple[list[dict], list[Image.Image]]:
        recs = [json.loads(x) for x in (root / name).read_text().splitlines() if x.strip()]
        return recs, [resize_for_generation(Image.open(root / r["image"]).convert("RGB"), spec) for r in recs]

    def encode(images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), 256):
            pv = ip(images=images[i : i + 256], return_tensors="pt")
            t = model.encode_images(pv["pixel_values"], pv["image_grid_thw"].long())
            out.append(t.view(-1, spec.gen_num_tokens, t.shape[-1]))
        return torch.cat(out)

    cache = root / "tokens.pt"
    _, imgs = load("gen.jsonl")
    hrecs, himgs = load("heldout_gen.jsonl")
    if cache.is_file():
        tok, htok = torch.load(cache)
    else:
        tok, htok = encode(imgs), encode(himgs)
        torch.save((tok, htok), cache)
    px, hpx = _pixels(imgs), _pixels(himgs)

    # Reference: ridge regression tokens -> pixels.
    x = tok.reshape(len(tok), -1)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x1 = torch.cat([(x - mu) / sd, torch.ones(len(x), 1)], 1)
    xh1 = torch.cat([(htok.reshape(len(htok), -1) - mu) / sd, torch.ones(len(htok), 1)], 1)
    w = torch.linalg.solve(x1.T @ x1 + 10.0 * torch.eye(x1.shape[1]), x1.T @ px.reshape(len(px), -1))
    ridge = (xh1 @ w).clamp(0, 1).reshape(hpx.shape)
    ridge_acc, ridge_psnr = _score(ridge, hpx, hrecs)

    cfg = decoder_preset(
        "tiny", token_dim=tok.shape[-1], num_tokens=tok.shape[1], image_size=spec.gen_image_size
    )
    cfg = dataclasses.replace(
        cfg,
        patch_size=args.patch,
        prediction=args.prediction,
        spatial_cond=args.spatial_cond,
        coarse_rank=args.coarse_rank,
    )
    if args.width:
        cfg = dataclasses.replace(
            cfg, num_attention_heads=args.width // 32, joint_attention_dim=args.width,
            pooled_projection_dim=args.width, adapter_hidden=2 * args.width,
        )  # fmt: skip
    dec = OrionDecoder(cfg)
    opt = torch.optim.AdamW(dec.parameters(), lr=args.lr, weight_decay=0.0)
    lat = dec.encode_images(px)
    if args.coarse_rank:
        fit = CoarseFit(dec)
        for i in range(0, len(lat), 500):
            fit.update(tok[i : i + 500], lat[i : i + 500])
        print("coarse fit", fit.solve(), flush=True)
        coarse = dec.decode_latents(dec.coarse_latents(htok))
        print("coarse alone (held-out)", _score(coarse, hpx, hrecs), flush=True)
    g = torch.Generator().manual_seed(0)
    steps, t0 = 0, time.time()
    while time.time() - t0 < args.budget and not (args.max_steps and steps >= args.max_steps):
        idx = torch.randint(0, len(lat), (args.batch,), generator=g)
        loss = flow_matching_loss(
            dec, lat[idx], tok[idx], generator=g, cond_dropout=0.1, loss_space=args.loss_space
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        steps += 1
        if steps % 100 == 0:
            print(f"step {steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    train_seconds = time.time() - t0
    dec.eval()
    results = {}
    for cfg_scale in (1.0, 2.0, 3.0):
        out = sample(dec, htok, steps=20, cfg_scale=cfg_scale, seed=0)
        results[f"cfg{cfg_scale:g}"] = dict(
            zip(("scorer_accuracy", "psnr"), _score(out, hpx, hrecs), strict=True)
        )
    summary = {
        "benchmark": "decoder design sweep (tiny, 64 px, random-init tiny tower tokens)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": vars(args),
        "train_steps": steps,
        "train_seconds": round(train_seconds, 1),
        "ridge_reference": {"scorer_accuracy": ridge_acc, "psnr": ridge_psnr},
        **results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
