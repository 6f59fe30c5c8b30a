"""Matmul throughput of this CPU in fp32 and bf16, to tell machines apart (issue 16's timings vary 2x
between sessions' machines) and to show why CPU training stays in fp32 (bf16 autocast is CUDA-only in the
trainer): without AVX-512 BF16 / AMX, bf16 GEMMs run far slower than fp32 ones.

    OMP_NUM_THREADS=1 python benchmarks/cpu_matmul.py [--repeats 20]

Prints one line per shape and dtype, and one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = ((512, 256, 1024), (512, 1024, 256), (2048, 256, 256))  # tiny-preset-like GEMMs (d = 256)


def gflops(n: int, k: int, m: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n * k * m * repeats / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for n, k, m in SHAPES:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate = gflops(n, k, m, dtype, args.repeats)
            rows.append({"shape": [n, k, m], "dtype": name, "gflops": round(rate, 2)})
            print(f"({n}x{k}) @ ({k}x{m}) {name}: {rate:.1f} GFLOP/s", flush=True)
    print(json.dumps({
        "benchmark": "cpu_matmul", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "results": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
