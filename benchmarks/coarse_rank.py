"""A model directory whose decoder keeps only the first R directions of its fitted coarse map.

    python benchmarks/coarse_rank.py MODEL OUT RANK

The coarse map's columns are ordered by singular value (``decoder/coarse.py``), so zeroing the
columns past R gives the rank-R reduced-rank fit: what a decoder small enough to commit would keep.
OUT links every file of MODEL but the decoder, which is rewritten; score it with ``orion eval
shapes-gen --model OUT``. Prints one JSON object last (rank, the map's fp32 size at that rank).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("rank", type=int)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose another OUT")
    args.out.mkdir(parents=True)
    for f in args.model.iterdir():
        if f.name != "decoder":
            (args.out / f.name).symlink_to(f.resolve())
    (args.out / "decoder").mkdir()
    shutil.copy(args.model / "decoder/decoder_config.json", args.out / "decoder/decoder_config.json")
    state = load_file(args.model / "decoder/decoder.safetensors")
    coarse_in, coarse_out = state["coarse_in.weight"], state["coarse_out.weight"]
    coarse_in[args.rank :] = 0
    coarse_out[:, args.rank :] = 0
    save_file(state, args.out / "decoder/decoder.safetensors")
    size_mb = (coarse_in.shape[1] + coarse_out.shape[0]) * args.rank * 4 / 1e6
    print(
        json.dumps(
            {
                "model": str(args.model),
                "out": str(args.out),
                "rank": args.rank,
                "map_mb_fp32": round(size_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
