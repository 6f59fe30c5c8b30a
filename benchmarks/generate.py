"""Image-token generation speed: the KV-cached engine against a no-cache loop (and, on GPU, the floor).

    python benchmarks/generate.py                       # CPU: tiny preset, cached vs no-cache
    python benchmarks/generate.py --preset qwen2.5-vl-7b --device cuda --batch 1 8   # GPU, random weights

For each batch size: wall time to generate one image's N visual tokens for a text-to-image prompt
(prefill + N regression steps + <|vision_end|>), with ``Engine(kv_cache=True)`` and, on CPU, with
``Engine(kv_cache=False)`` (the whole sequence recomputed every step). On CUDA it also measures the
device's copy bandwidth and reports the memory-bandwidth floor per step (weight bytes / bandwidth:
every decoding step must read all weights once) and the ratio of the measured per-step time to it.
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from orion_mllm.inference.engine import Engine, SamplingConfig  # noqa: E402
from orion_mllm.inference.pipeline import OrionPipeline  # noqa: E402
from orion_mllm.inference.session import ChatSession  # noqa: E402
from orion_mllm.model.orion import OrionModel  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * a.element_size() * 5 / (time.perf_counter() - t0)


def time_generation(engine: Engine, prompts, repeats: int) -> float:
    cfg = SamplingConfig(max_new_tokens=1, allow_images=False)
    engine.generate(prompts, cfg)  # warm-up
    _sync(engine.lm.embed_tokens.weight.device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompts, cfg)
        _sync(engine.lm.embed_tokens.weight.device)
        best = min(best, time.perf_counter() - t0)
    assert all(len(o.images) == 1 for o in out)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = OrionModel.from_preset(args.preset, dtype=dtype)
    model = model.to(device).eval()
    pipe = OrionPipeline(model, device=device)
    session = ChatSession()
    session.add("user", ["Generate an image of a red circle above a blue square."])
    base = pipe.prompt(session, open_image=True)
    n_tokens = pipe.engine.image_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.backbone.model.language_model.parameters())
    weight_bytes += sum(p.numel() * p.element_size() for p in model.vision_head.parameters())
    rows = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for b in args.batch:
        prompts = [base] * b
        row = {"batch": b, "image_tokens": n_tokens, "prompt_tokens": int(base.input_ids.numel())}
        cached = time_generation(Engine(model, kv_cache=True), prompts, args.repeats)
        row["cached_s"] = round(cached, 4)
        row["cached_ms_per_step"] = round(1000 * cached / (n_tokens + 2), 3)
        if device.type == "cpu":
            nocache = time_generation(Engine(model, kv_cache=False), prompts, args.repeats)
            row["no_cache_s"] = round(nocache, 4)
            row["speedup"] = round(nocache / cached, 2)
        if bandwidth:
            floor = weight_bytes / bandwidth
            row["floor_ms_per_step"] = round(1000 * floor, 3)
            row["ratio_to_floor"] = round(cached / (n_tokens + 2) / floor, 2)
        rows.append(row)
        print(row, flush=True)
    result = {
        "benchmark": "image-token generation (KV-cached engine)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1) if bandwidth else None,
        "rows": rows,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
