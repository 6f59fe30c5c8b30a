"""Show what a model answers on ``shapes-und``, question by question (a diagnosis aid for issue 16).

    python benchmarks/und_answers.py --model DIR --data EVAL_DIR [--n 60] [--qtype shape]

Prints one line per question (type, question, gold answer, the model's answer) and, last, a JSON
line with the accuracy per type computed the way ``orion eval shapes-und`` does (circular multiple
choice counted once per rotation here, so the lines show which rotation fails).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from orion_mllm.eval.model_eval import answer_many, read_jsonl
from orion_mllm.eval.shapes_und_edit import mcq_letter, normalise, score_understanding
from orion_mllm.inference.pipeline import OrionPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="ShapesWorld folder with und.jsonl")
    ap.add_argument("--n", type=int, default=60, help="records to ask (default 60)")
    ap.add_argument("--qtype", default=None, help="only records of this question type")
    args = ap.parse_args()
    records = [r for r in read_jsonl(args.data / "und.jsonl") if args.qtype in (None, r["qtype"])][: args.n]
    pipe = OrionPipeline.load(args.model)
    asked: list[tuple[Path, list[dict[str, str]]]] = []

    def record_question(image: Path, turns: list[dict[str, str]]) -> str:
        asked.append((image, [dict(t) for t in turns]))
        return ""

    score_understanding(records, args.data, record_question)
    answers = answer_many(pipe, asked, progress=False)
    it = iter(answers)
    scores = score_understanding(records, args.data, lambda image, turns: next(it))
    # The lines: question text and answer, with the gold where the record states it directly.
    golds = []
    for record in records:
        turns = record["conversations"]
        if record["qtype"] == "mcq":
            golds += [f"option {record['options']['ABCD'.index(record['answer'])]!r}"] * len(
                record["options"]
            )
        elif record["qtype"] == "caption":
            golds.append(turns[1]["value"])
        else:
            golds += [turns[2 * k + 1]["value"] for k in range(len(record.get("qtypes", [record["qtype"]])))]
    per_type: dict[str, int] = defaultdict(int)
    for (_, turns), gold, answer in zip(asked, golds, answers, strict=True):
        question = turns[-1]["value"].removeprefix("<image>\n").replace("\n", " | ")
        letter = mcq_letter(answer)
        per_type[question[:12]] += 1
        print(
            f"Q: {question[:110]}\n   gold: {gold[:80]}   answer: {answer[:80]!r}"
            + (f" (letter {letter})" if "A. " in question else "")
            + ("" if "A. " in question or normalise(gold) != normalise(answer) else "  OK")
        )
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
