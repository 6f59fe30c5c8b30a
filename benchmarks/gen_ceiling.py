"""The ceiling the decoder sets on shapes-gen: each prompt drawn from the *true* tokens of the picture
its caption trains on (issue 16's diagnosis).

    python benchmarks/gen_ceiling.py --model runs/qs/model [--size 64] [--batch-size 32]

For every one of the 552 shapes-gen prompts, the canonical scene its caption stands for in training
(``canonical_scene``: default colours, fixed slots) is rendered, encoded by the model's frozen tower
and rendered back by the model's decoder; the pixel scorer then judges it against the prompt. A model
whose LLM regressed those tokens exactly would score this. A prompt with no canonical layout would be
drawn from the oracle scene the prompt set carries instead.
Also scores the rendered canonical scenes themselves (the scorer on clean pictures).

Prints one JSON object last: ``ceiling`` (per category and overall) and ``clean``.
"""

from __future__ import annotations

import argparse
import json
import time

from orion_mllm.data.shapes.datasets import canonical_scene
from orion_mllm.data.shapes.render import render_scene
from orion_mllm.data.shapes.scorer import score_images
from orion_mllm.eval.model_eval import picture_tokens, render_tokens
from orion_mllm.eval.shapes_gen import prompt_set
from orion_mllm.inference.pipeline import OrionPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ORION model directory with decoder/")
    ap.add_argument("--size", type=int, default=64, help="ShapesWorld image side (the generation size)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    t0 = time.time()
    pipe = OrionPipeline.load(args.model, image_separator="\n")
    if pipe.decoder is None:
        raise SystemExit(f"{args.model}: no decoder/ folder (the ceiling is the decoder's)")
    prompts = prompt_set()
    scenes = []
    for p in prompts:
        try:
            scenes.append(canonical_scene(p.spec))
        except ValueError:
            scenes.append(p.scene)
    pictures = [render_scene(s, args.size) for s in scenes]
    tokens = picture_tokens(pipe, pictures, batch_size=args.batch_size)
    rendered = render_tokens(pipe, tokens, batch_size=args.batch_size)
    ceiling = score_images([(p.spec, im) for p, im in zip(prompts, rendered, strict=True)])
    clean = score_images([(p.spec, im) for p, im in zip(prompts, pictures, strict=True)])
    print(
        json.dumps(
            {"model": args.model, "ceiling": ceiling, "clean": clean, "seconds": round(time.time() - t0, 1)}
        )
    )


if __name__ == "__main__":
    main()
