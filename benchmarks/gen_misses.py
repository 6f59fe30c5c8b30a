"""Where a shapes-gen folder loses its points: accuracy per requested shape and the commonest misses.

    python benchmarks/gen_misses.py runs/qs/eval/final/gen [--category single_object] [--top 10]
        [--train-gen runs/qs/data/shapes-tiny/gen.jsonl]

Reads a GenEval-layout folder written by ``orion eval shapes-gen`` (or the quickstart), judges each
image with the ShapesWorld scorer, and prints, per shape named in the prompts, the share of its
prompts judged right, then the commonest (requested objects -> detected objects) pairs among the
misses of ``--category`` (all categories by default). With ``--train-gen`` (the run's generation
training file) it also splits the prompts whose caption is not in it by why
(``orion_mllm.eval.model_eval.TrainingCaptions``), with the share drawn right, and scores the seen and
the unseen prompts apart (GenEval's category means and overall). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

from PIL import Image

from orion_mllm.data.shapes.scorer import detect_objects, judge, score_judgments
from orion_mllm.eval.model_eval import training_captions
from orion_mllm.eval.shapes_gen import iter_layout


def _share(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 3) if hits else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="shapes-gen output folder (GenEval layout)")
    ap.add_argument("--category", default=None, help="only this category's misses (e.g. single_object)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--train-gen", default=None, help="the run's gen.jsonl: split unseen captions by reason")
    args = ap.parse_args()
    training = training_captions(args.train_gen) if args.train_gen else None
    judged: list[tuple] = []
    by_shape: dict[str, list[bool]] = defaultdict(list)
    misses: Counter = Counter()
    n = 0
    for spec, path in iter_layout(args.folder):
        image = Image.open(path)
        right = judge(spec, image)
        n += 1
        for o in spec.objects:
            by_shape[o.shape].append(right)
        judged.append((spec, right))
        if not right and args.category in (None, spec.category):
            asked = tuple((o.colour, o.shape, o.count) for o in spec.objects)
            seen = tuple(sorted((d.colour, d.shape) for d in detect_objects(image)))
            misses[(spec.category, asked, seen)] += 1
    shapes = {s: round(sum(v) / len(v), 3) for s, v in sorted(by_shape.items())}
    for s, acc in shapes.items():
        print(f"{s:10s} {acc:.3f} ({len(by_shape[s])} prompts)")
    top = [
        {"category": c, "asked": a, "detected": d, "count": k}
        for (c, a, d), k in misses.most_common(args.top)
    ]
    for m in top:
        print(f"{m['count']:3d}  {m['category']}: {m['asked']} -> {m['detected']}")
    by_reason = training.unseen_by_reason(judged) if training is not None else {}
    split = {}
    if training is not None:  # GenEval's scores (category means and their mean) on each side of the split
        for side, want in (("seen", True), ("unseen", False)):
            part = [(spec, right) for spec, right in judged if training.seen(spec) == want]
            scores = score_judgments(part)
            scores.pop("n")
            split[side] = {"prompts": len(part), "prompt_share_right": _share([r for _, r in part]),
                           **{k: round(v, 3) for k, v in scores.items()}}  # fmt: skip
            print(f"{side}: {json.dumps(split[side])}")
    for r, v in by_reason.items():
        print(f"unseen, {r}: {v['accuracy']:.3f} of {v['prompts']} prompts")
    print(json.dumps({"folder": args.folder, "images": n, "per_shape": shapes, "misses": sum(misses.values()),
                      "top_misses": top, "unseen_by_reason": by_reason, **split}))  # fmt: skip


if __name__ == "__main__":
    main()
