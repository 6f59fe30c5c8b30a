"""Write draw-then-ask training dialogues from a ShapesWorld folder's text-to-image records (issue 16).

Each ``gen.jsonl`` record becomes: a request -> the record's picture (the assistant's image) -> "How
many <shape>s are there?" about a shape in the picture or one absent from it -> the count. With
``--vague`` share of the requests replaced by a request that names nothing ("Draw some shapes."), the
answer can only come from the picture: what ``shapes-interleaved``'s swapped-drawing control asks of
a model. The evaluation dialogues (``interleaved.jsonl`` of the eval set) are written with another
seed from other scenes; these reuse only the training folder's own pictures.

    python benchmarks/draw_then_ask_data.py runs/qs-s11/data/shapes-tiny --out draw_ask.jsonl --vague 1.0

Prints one JSON line: records written and the answers' distribution.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from orion_mllm.data.shapes.datasets import plural
from orion_mllm.data.shapes.world import SHAPES

VAGUE = (
    "Draw a picture.",
    "Draw some shapes.",
    "Draw a picture with a few shapes.",
    "Make a picture of some shapes.",
    "Draw whatever shapes you like.",
    "Show me a picture of shapes.",
)


def dialogue(record: dict, rng: random.Random, vague: float) -> dict:
    present = [o["shape"] for o in record["scene"]["objects"]]
    absent = [s for s in SHAPES if s not in present]
    shape = rng.choice(sorted(set(present))) if rng.random() < 0.5 or not absent else rng.choice(absent)
    request = rng.choice(VAGUE) if rng.random() < vague else record["conversations"][0]["value"]
    answer = str(present.count(shape))
    return {
        "id": record["id"].replace("gen-", "drawask-"),
        "task": "interleaved",
        "image": record["image"],
        "answer": answer,
        "conversations": [
            {"from": "human", "value": request},
            {"from": "gpt", "value": "<image>"},
            {"from": "human", "value": f"How many {plural(shape)} are there?"},
            {"from": "gpt", "value": answer},
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a ShapesWorld folder (its gen.jsonl and images/)")
    p.add_argument("--out", default="draw_ask.jsonl", help="file name inside DATA (default: draw_ask.jsonl)")
    p.add_argument("--vague", type=float, default=1.0, help="share of requests that name nothing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(args.data)
    rng = random.Random(f"draw-ask/{args.seed}")
    records = [json.loads(line) for line in (root / "gen.jsonl").read_text().splitlines() if line.strip()]
    dialogues = [dialogue(r, rng, args.vague) for r in records]
    (root / args.out).write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    answers = Counter(d["answer"] for d in dialogues)
    print(
        json.dumps(
            {
                "written": len(dialogues),
                "file": str(root / args.out),
                "answers": dict(sorted(answers.items())),
            }
        )
    )


if __name__ == "__main__":
    main()
