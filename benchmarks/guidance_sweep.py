"""Choose the token-space guidance weight on validation prompts, not on the evaluation's.

    python benchmarks/guidance_sweep.py --model runs/qs/model --data runs/qs/data/shapes-tiny \
        [--weights 1 1.5 2 3] [--file heldout_gen.jsonl]

Generates one picture per record for each guidance weight and scores it with the pixel scorer against
the record's spec (GenEval's rules, as ``shapes-gen``). The records: the first ``--per-category``
records of each category in ``--file`` with distinct captions; the default is the *training* file
(``gen.jsonl``: settings are chosen on training data, then confirmed on the evaluation prompts).
``heldout_gen.jsonl`` holds only captions training never sees (a generalisation probe).
Prints a line per weight and, last, one JSON object: the scores per weight and the best weight.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orion_mllm.data.shapes.scorer import Spec, score_images
from orion_mllm.eval.model_eval import generate_images, read_jsonl
from orion_mllm.inference.pipeline import OrionPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="the ShapesWorld folder the model trained on")
    ap.add_argument("--file", default="gen.jsonl")
    ap.add_argument("--per-category", type=int, default=30)
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    records, seen, count = [], set(), {}
    for r in read_jsonl(args.data / args.file):
        if r["caption"] in seen or count.get(r["category"], 0) >= args.per_category:
            continue
        seen.add(r["caption"])
        count[r["category"]] = count.get(r["category"], 0) + 1
        records.append(r)
    requests = [r["conversations"][0]["value"] for r in records]
    specs = [Spec.from_dict(r["spec"]) for r in records]
    pipe = OrionPipeline.load(args.model)
    result: dict = {"model": str(args.model), "file": args.file, "records": len(records), "scores": {}}
    for w in args.weights:
        images = generate_images(pipe, requests, seed=args.seed, progress=False, guidance=w)
        scores = score_images(zip(specs, images, strict=True))
        result["scores"][str(w)] = scores
        print(
            f"guidance {w}: overall {scores['overall']:.3f}  "
            + "  ".join(f"{k} {v:.2f}" for k, v in scores.items() if k not in ("overall", "n"))
        )
    result["best"] = max(result["scores"], key=lambda w: result["scores"][w]["overall"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
