"""HTTP API throughput and latency against the engine called in-process.

    python benchmarks/serve.py [--preset micro] [--requests 32] [--concurrency 1 4 16]

Starts ``orion serve``'s app (uvicorn, loopback, random-init model of ``--preset`` with a decoder of
the same size) and, for image generation (``/v1/images/generations``) and understanding
(``/v1/chat/completions`` with one image and a question, 8 new tokens), sends ``--requests``
requests at each concurrency from a thread pool, recording requests/s and p50 / p95 latency. The
baseline is the same work through ``OrionPipeline`` in-process, one request after another; the
ratio (server requests/s / in-process requests/s) shows what the server costs or, through
batching, gains. Last line: JSON.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from orion_mllm.decoder.model import OrionDecoder, decoder_preset  # noqa: E402
from orion_mllm.inference.engine import SamplingConfig  # noqa: E402
from orion_mllm.inference.pipeline import OrionPipeline  # noqa: E402
from orion_mllm.model.orion import OrionModel  # noqa: E402
from orion_mllm.serve.app import create_app  # noqa: E402
from orion_mllm.serve.background import BackgroundServer  # noqa: E402
from orion_mllm.serve.openai_api import ServeConfig  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--decoder-steps", type=int, default=4)
    args = ap.parse_args()
    model = OrionModel.from_preset(args.preset, seed=0).eval()
    spec = model.config.image_spec
    cfg = decoder_preset(
        args.preset,
        token_dim=model.hidden_size,
        num_tokens=spec.gen_num_tokens,
        image_size=spec.gen_image_size,
    )
    decoder = OrionDecoder(dataclasses.replace(cfg, patch_size=16, prediction="sample")).eval()
    decoder.config.extra["sample_steps"] = args.decoder_steps
    pipe = OrionPipeline(model, decoder)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (spec.gen_image_size, spec.gen_image_size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "How many circles are there?"
    bodies = {
        "generation": (
            "/v1/images/generations",
            {"model": "bench", "prompt": "a red circle above a blue square"},
        ),
        "understanding": (
            "/v1/chat/completions",
            {
                "model": "bench",
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url}},
                            {"type": "text", "text": question},
                        ],
                    }
                ],
            },
        ),
    }

    def direct(kind: str) -> None:
        if kind == "generation":
            tokens, _ = pipe.image_tokens(bodies["generation"][1]["prompt"])
            pipe.render(tokens)
        else:
            pipe.ask([img], question, SamplingConfig(max_new_tokens=8, allow_images=False))

    server = BackgroundServer(create_app(pipe, ServeConfig(model_name="bench", max_queue=256, max_batch=16)))
    rows = []
    try:
        for kind, (path, body) in bodies.items():
            direct(kind)  # warm-up
            t0 = time.perf_counter()
            lat = []
            for _ in range(args.requests):
                t = time.perf_counter()
                direct(kind)
                lat.append(time.perf_counter() - t)
            base_rps = args.requests / (time.perf_counter() - t0)
            rows.append(
                {
                    "kind": kind,
                    "mode": "in-process",
                    "concurrency": 1,
                    "rps": round(base_rps, 2),
                    "p50_ms": round(1000 * _pct(lat, 0.5), 1),
                    "p95_ms": round(1000 * _pct(lat, 0.95), 1),
                }
            )
            print(rows[-1], flush=True)
            with httpx.Client(base_url=server.url, timeout=300) as http:
                http.post(path, json=body).raise_for_status()  # warm-up
                for c in args.concurrency:

                    def one(_, http=http, path=path, body=body):
                        t = time.perf_counter()
                        r = http.post(path, json=body)
                        r.raise_for_status()
                        return time.perf_counter() - t

                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(c) as pool:
                        lat = list(pool.map(one, range(args.requests)))
                    rps = args.requests / (time.perf_counter() - t0)
                    rows.append(
                        {
                            "kind": kind,
                            "mode": "server",
                            "concurrency": c,
                            "rps": round(rps, 2),
                            "p50_ms": round(1000 * _pct(lat, 0.5), 1),
                            "p95_ms": round(1000 * _pct(lat, 0.95), 1),
                            "vs_in_process": round(rps / base_rps, 2),
                            "mean_ms": round(1000 * statistics.mean(lat), 1),
                        }
                    )
                    print(rows[-1], flush=True)
    finally:
        server.stop()
    result = {
        "benchmark": "HTTP API vs in-process engine",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": platform.processor() or "cpu", "threads": torch.get_num_threads()},
        "preset": args.preset,
        "requests": args.requests,
        "decoder_steps": args.decoder_steps,
        "rows": rows,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
