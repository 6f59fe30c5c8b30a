"""ShapesWorld throughput: dataset rendering + writing, and scorer speed.

    python benchmarks/shapes.py          # 2,000-sample writes at 64 and 252 px; scorer speed and accuracy
                                         # (clean, and at 64 px after blur 1 px / noise 0.05 / a 2-px shift)
    python benchmarks/shapes.py --full   # also the 50,000-sample write at 64 px (goal: < 5 min)

Writes into a temporary folder (deleted afterwards). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from orion_mllm.data.shapes.datasets import write_shapes_dataset
from orion_mllm.data.shapes.render import render_scene
from orion_mllm.data.shapes.scorer import CATEGORIES, judge, sample_spec_and_scene


def write_rate(size: int, n: int) -> dict:
    """Samples/s of ``write_shapes_dataset`` for n training samples (40% und, 40% gen, 20% edit)."""
    folder = Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    try:
        n_und, n_gen = int(n * 0.4), int(n * 0.4)
        n_edit = n - n_und - n_gen
        start = time.perf_counter()
        write_shapes_dataset(folder, size=size, n_und=n_und, n_gen=n_gen, n_edit=n_edit, n_interleaved=0,
                             n_heldout=0, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        mib = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"size": size, "samples": n, "seconds": round(seconds, 2), "samples_per_s": round(n / seconds, 1),
            "disk_mib": round(mib, 1)}  # fmt: skip


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(1))


def noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(image, dtype=np.float32) / 255 + rng.normal(0, 0.05, (image.height, image.width, 3))
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


def score_rate(size: int, n: int, perturb: str = "none") -> dict:
    """Scorer images per second on ground-truth renders (rendering excluded from the timing)."""
    rng = random.Random(0)
    noise_rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        spec, scene = sample_spec_and_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        image = render_scene(scene, size)
        if perturb == "blur":
            image = blur(image)
        elif perturb == "noise":
            image = noise(image, noise_rng)
        elif perturb == "shift":
            image = Image.new("RGB", image.size, "white")
            image.paste(render_scene(scene, size).crop((0, 0, size - 2, size - 2)), (2, 2))
        pairs.append((spec, image))
    start = time.perf_counter()
    correct = sum(judge(spec, image) for spec, image in pairs)
    seconds = time.perf_counter() - start
    return {"size": size, "images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
            "accuracy": correct / n}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000, help="samples per write run (default: 2000)")
    parser.add_argument("--score-images", type=int, default=600, help="images per scorer run (default: 600)")
    parser.add_argument("--full", action="store_true", help="also write 50,000 samples at 64 px")
    args = parser.parse_args()

    results: dict = {"benchmark": "shapesworld", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                                 "processor": platform.processor() or platform.machine()}}  # fmt: skip
    for size in (64, 252):
        r = write_rate(size, args.samples)
        rate = r["samples_per_s"]
        print(f"write  {size:>3} px: {r['samples']} samples in {r['seconds']} s = {rate} samples/s")
        results[f"write_{size}px_samples_per_s"] = r["samples_per_s"]
        s = score_rate(size, args.score_images)
        print(f"score  {size:>3} px: {s['images']} images in {s['seconds']} s = {s['images_per_s']} images/s "
              f"(accuracy {s['accuracy']:.4f})")  # fmt: skip
        results[f"score_{size}px_images_per_s"] = s["images_per_s"]
        results[f"score_{size}px_accuracy"] = s["accuracy"]
    for perturb in ("blur", "noise", "shift"):
        s = score_rate(64, args.score_images, perturb)
        print(f"score   64 px after {perturb:5s}: accuracy {s['accuracy']:.4f} on {s['images']} images")
        results[f"score_64px_{perturb}_accuracy"] = s["accuracy"]
    if args.full:
        r = write_rate(64, 50_000)
        print(f"write   64 px: 50,000 samples in {r['seconds']} s ({r['disk_mib']} MiB); goal < 300 s")
        results["write_50k_64px_seconds"] = r["seconds"]
        results["write_50k_goal_met"] = r["seconds"] < 300
    print(json.dumps(results))


if __name__ == "__main__":
    main()
