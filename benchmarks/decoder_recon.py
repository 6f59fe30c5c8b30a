"""Decoder reconstruction benchmark: train a ShapesWorld decoder, decode held-out images' tokens, score.

    python benchmarks/decoder_recon.py [--preset tiny] [--max-steps 1500] [--out runs/bench-decoder]

1. The decoder recipe's ShapesWorld data (generated into its ``data_root``, or ``--data``, if missing;
   a folder written with other settings is refused) and the decoder recipe
   ``recipes/shapes/<preset>/decoder.yaml``, trained by the same ``DecoderTrainer`` as ``orion train``
   with the encoder given by ``--encoder`` (default ``preset:<preset>``: the random-init base tower;
   the quickstart uses its trained stage-0 base instead).
2. The held-out generation images (``heldout_gen.jsonl``: the canonical pictures of held-out captions,
   which the decoder's free-layout training images never are; in data written with
   ``holdout: pairs``, colour-shape pairs and counts never seen in training) are encoded to visual
   tokens by the same frozen tower and rendered back by the decoder.
3. Each reconstruction is judged by the ShapesWorld scorer against the source scene: the same
   multiset of (colour, shape) objects, each within 0.1 of its position (``scene_matches``); PSNR
   against the source image is reported too.

Last line: one JSON object with ``scorer_accuracy``, ``psnr``, ``train_minutes``, ``steps``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from orion_mllm.decoder.flow import sample  # noqa: E402
from orion_mllm.decoder.model import OrionDecoder  # noqa: E402
from orion_mllm.eval.shapes_und_edit import scene_matches  # noqa: E402
from orion_mllm.images import resize_for_generation  # noqa: E402
from orion_mllm.train.decoder_trainer import DecoderTrainer, TokenEncoder  # noqa: E402
from orion_mllm.train.recipe import load_recipe  # noqa: E402
from orion_mllm.train.setup import ensure_shapes_data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["micro", "tiny"])
    ap.add_argument("--max-steps", type=int, default=None, help="override the recipe's step cap")
    ap.add_argument("--encoder", default=None, help="default preset:<preset>")
    ap.add_argument("--data", default=None, help="ShapesWorld folder (default: the recipe's data_root)")
    ap.add_argument("--out", default=None, help="run directory (default runs/bench-decoder-<preset>)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the decoder's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-only", default=None, help="score this trained decoder directory; no training")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optim.max_lr=4e-3")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench-decoder-{args.preset}")
    # The decoder recipe's own image set (data/shapes-<preset>-decoder) unless --data names another;
    # the trainer refuses a folder written with other settings than the recipe's shapes_data.
    overrides = [f"encoder={args.encoder or 'preset:' + args.preset}"]
    if args.data:
        overrides.append(f"data_root={args.data}")
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    overrides += args.overrides
    recipe = load_recipe(REPO / f"recipes/shapes/{args.preset}/decoder.yaml", overrides)
    data = recipe.data_root
    if args.eval_only:
        ensure_shapes_data(recipe, progress=False)  # the held-out images of the recipe's settings
        final, train_minutes = Path(args.eval_only), None
        info = (
            json.loads((final.parent / "run.json").read_text())
            if (final.parent / "run.json").is_file()
            else {}
        )
    else:
        t0 = time.time()
        final = DecoderTrainer(recipe, out).run()
        train_minutes = (time.time() - t0) / 60
        info = json.loads((out / "run.json").read_text())

    decoder = OrionDecoder.from_pretrained(final).eval()
    extra = decoder.config.extra
    args.steps = args.steps or int(extra.get("sample_steps", 20))
    args.cfg = float(extra.get("cfg_scale", 1.0)) if args.cfg is None else args.cfg
    encoder = TokenEncoder(decoder.config.extra["encoder"], recipe, torch.device("cpu"))
    root = Path(data)
    records = [json.loads(x) for x in (root / "heldout_gen.jsonl").read_text().splitlines() if x.strip()]
    images = [
        resize_for_generation(Image.open(root / r["image"]).convert("RGB"), encoder.spec) for r in records
    ]
    t1 = time.time()
    correct, psnrs = 0, []
    for i in range(0, len(images), 50):
        batch = images[i : i + 50]
        recon = sample(decoder, encoder(batch), steps=args.steps, cfg_scale=args.cfg, seed=0)
        for rec, src, img in zip(records[i : i + 50], batch, recon, strict=True):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            ref = np.asarray(src, dtype=np.float32) / 255
            mse = float(((arr.astype(np.float32) / 255 - ref) ** 2).mean())
            psnrs.append(10 * np.log10(1 / max(mse, 1e-10)))
            correct += scene_matches(Image.fromarray(arr), rec["scene"])
        if i == 0:
            out.mkdir(parents=True, exist_ok=True)
            grid = Image.new(
                "RGB", (encoder.spec.gen_image_size * 8, encoder.spec.gen_image_size * 2), "white"
            )
            for k in range(min(8, len(batch))):
                s = encoder.spec.gen_image_size
                grid.paste(batch[k], (k * s, 0))
                grid.paste(
                    Image.fromarray((recon[k].permute(1, 2, 0).numpy() * 255).round().astype("uint8")),
                    (k * s, s),
                )
            grid.save(out / "reconstructions.png")
    result = {
        "benchmark": "decoder reconstruction (ShapesWorld held-out)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_count": torch.get_num_threads(), "python": platform.python_version()},
        "preset": args.preset,
        "encoder": decoder.config.extra["encoder"],
        "images": len(records),
        "scorer_accuracy": correct / len(records),
        "psnr": float(np.mean(psnrs)),
        "train_minutes": None if train_minutes is None else round(train_minutes, 2),
        "steps": int(info.get("steps", 0)),
        "sample_steps": args.steps,
        "cfg_scale": args.cfg,
        "decode_seconds": round(time.time() - t1, 1),
        "grid": str(out / "reconstructions.png"),
    }
    print(f"scorer accuracy {result['scorer_accuracy']:.3f}, PSNR {result['psnr']:.2f} dB, "
          f"{result['steps']} steps, trained in {result['train_minutes']} min")  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
