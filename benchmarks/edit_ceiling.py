"""The ceiling the decoder sets on shapes-edit: each edit drawn from the *true* tokens of its target
(issue 16's diagnosis of editing).

    python benchmarks/edit_ceiling.py --model runs/qs/model --data runs/qs/data/eval [--n 200]

For the first ``--n`` records of the folder's ``edit.jsonl`` (what ``orion eval shapes-edit`` scores),
the target picture is encoded by the model's frozen tower and rendered back by the model's decoder,
then judged by the same rule as the benchmark (``eval.shapes_und_edit.edit_correct``). A model that
regressed the target tokens exactly would score ``ceiling``. ``copy``: the same for the *source*
picture's tokens (a model that returns its input unchanged); ``clean``: the target pictures themselves.

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from orion_mllm.eval.model_eval import picture_tokens, read_jsonl, render_tokens
from orion_mllm.eval.shapes_und_edit import _accuracy_by_group, edit_correct
from orion_mllm.inference.pipeline import OrionPipeline


def _score(records: list[dict], images: list[Image.Image]) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for r, im in zip(records, images, strict=True):
        hits.setdefault(r["op"], []).append(edit_correct(r, im))
    return _accuracy_by_group(hits, "edits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ORION model directory with decoder/")
    ap.add_argument("--data", required=True, help="ShapesWorld folder with edit.jsonl (the eval set)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    t0 = time.time()
    pipe = OrionPipeline.load(args.model, image_separator="\n")
    if pipe.decoder is None:
        raise SystemExit(f"{args.model}: no decoder/ folder (the ceiling is the decoder's)")
    root = Path(args.data)
    records = read_jsonl(root / "edit.jsonl")[: args.n]
    sources = [Image.open(root / r["images"][0]).convert("RGB") for r in records]
    targets = [Image.open(root / r["images"][1]).convert("RGB") for r in records]
    bs = args.batch_size
    ceiling = render_tokens(pipe, picture_tokens(pipe, targets, batch_size=bs), batch_size=bs)
    copied = render_tokens(pipe, picture_tokens(pipe, sources, batch_size=bs), batch_size=bs)
    print(
        json.dumps(
            {
                "model": args.model,
                "ceiling": _score(records, ceiling),
                "copy": _score(records, copied),
                "clean": _score(records, targets),
                "seconds": round(time.time() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
