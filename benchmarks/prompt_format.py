"""Does drawing depend on how the request is phrased? shapes-gen's prompts under several phrasings.

    python benchmarks/prompt_format.py --model runs/qs/model [--formats geneval draw template] [--train-gen F]

shapes-gen feeds GenEval's prompts as they are ("a photo of a diamond and a square"); ShapesWorld
trains on captions inside request templates ("Draw a diamond and a square.", 36 of them,
``orion_mllm.data.templates``). This scores the same 552 prompts (same specs, same pixel scorer,
guidance 1) phrased as ``geneval`` (as shapes-gen does), ``draw`` ("Draw {caption}.") and
``template`` (one random training template per prompt, seeded), so a format gap shows as a score gap.
With ``--train-gen`` each phrasing's unseen-caption split is printed too. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from orion_mllm.data.shapes.scorer import judge, score_judgments
from orion_mllm.data.templates import generation_prompt
from orion_mllm.eval.model_eval import generate_images, training_captions
from orion_mllm.eval.shapes_gen import prompt_set
from orion_mllm.inference.pipeline import OrionPipeline

PREFIX = "a photo of "


def phrase(prompt: str, fmt: str, rng: random.Random) -> str:
    caption = prompt.removeprefix(PREFIX)
    if fmt == "geneval":
        return prompt
    if fmt == "draw":
        return f"Draw {caption}."
    if fmt == "template":
        return generation_prompt(caption, rng)
    raise ValueError(f"unknown format {fmt!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--formats", nargs="+", default=["geneval", "draw", "template"])
    ap.add_argument("--train-gen", type=Path, default=None, help="the run's gen.jsonl (unseen split)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompts = prompt_set()
    seen = training_captions(args.train_gen) if args.train_gen else None
    pipe = OrionPipeline.load(args.model)
    result: dict = {"model": str(args.model), "prompts": len(prompts), "scores": {}}
    for fmt in args.formats:
        rng = random.Random(args.seed)
        requests = [phrase(p.prompt, fmt, rng) for p in prompts]
        images = generate_images(pipe, requests, seed=args.seed, progress=False, guidance=1.0)
        judged = [(p.spec, judge(p.spec, im)) for p, im in zip(prompts, images, strict=True)]
        scores: dict = score_judgments(judged)
        if seen is not None:
            scores["unseen_by_reason"] = seen.unseen_by_reason(judged)
        result["scores"][fmt] = scores
        shown = "  ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, float) and k != "n")
        print(f"{fmt:9s} e.g. {requests[100]!r}: {shown}  {scores.get('unseen_by_reason', '')}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
