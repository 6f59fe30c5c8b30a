"""How understanding questions are put and answered: can the tiny LLM do more in another format (issue 16)?

Two formats, each a rewrite of a ShapesWorld folder's ``und.jsonl`` (every other file linked as is;
since session 17 the generator writes both itself: ``shapes_data.question_first`` and
``mcq_answer: reasoned``, the ``--question-first --mcq-reasoned sentence`` rewrite byte for byte):

- ``--question-first``: in a causal LLM the picture's tokens cannot see a question that comes after
  them, so "What colour is the circle?" must be answered by one retrieval from the answer position:
  find the circle's token among all of them and read its colour. With the question first, every
  visual token can attend to it and flag itself, and the answer reads the flagged token. A first
  human turn ``<image>\nQ`` becomes ``Q\n<image>``.
- ``--mcq-reasoned``: a multiple-choice answer is the option's letter alone, which asks for three
  steps at one position (look the colour up, find the option naming it, read that option's letter);
  the base answers one letter to everything. Here the answer first names the colour, as a colour
  question's answer does, then the letter ("Red, so B." or "The star is red, so B."): the letter is
  then a copy from the options, next to the colour word just written. The letter stays extractable
  the MMBench way (``shapes_und_edit.mcq_letter``), so scoring is unchanged. (Measured in session 14,
  benchmarks/SMALL_SCALE.md: the colour is named right, the copy is not learned in stage 0's budget.)

    python benchmarks/und_format.py rewrite SRC DST [--question-first] [--mcq-reasoned short|sentence]
    python benchmarks/und_format.py eval --model M --data EVAL [--n 1000] [--order first|after]
        [--show K --qtype mcq]

``eval`` scores ``shapes-und`` the way ``orion eval shapes-und`` does (same questions, circular
multiple choice, same scoring), with every question's picture placed as ``--order`` says; ``--show K``
first prints K questions (of ``--qtype``) with their gold and the model's answer, and the share right
per question (rotations counted apart). It prints the accuracy per type as JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from orion_mllm.data.shapes.datasets import IMAGE_TAG as IMAGE
from orion_mllm.data.shapes.datasets import ask_about_image, mcq_answer_text, question_of


def question_first_turn(value: str) -> str:
    """``<image>\\nQ`` -> ``Q\\n<image>``; a turn in any other form is returned unchanged."""
    return ask_about_image(question_of(value), True) if value.startswith(IMAGE + "\n") else value


def question_first_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [dict(t) for t in turns]
    if out and out[0].get("from") == "human":
        out[0]["value"] = question_first_turn(out[0]["value"])
    return out


def reasoned_mcq_answer(record: dict[str, Any], style: str = "short") -> str:
    """``short``: ``Red, so B.`` (the colour as colour answers write it, then the letter). ``sentence``:
    ``The star is red, so B.``, whose colour word is the very token the options hold (" red"), so the
    letter is a copy from where that token stands in the options."""
    letter = record["answer"]
    colour = record["options"]["ABCD".index(letter)]
    if style == "sentence":  # what `shapes_data.mcq_answer: reasoned` writes
        shape = record["conversations"][0]["value"].split("What colour is the ", 1)[1].split("?", 1)[0]
        return mcq_answer_text(shape, colour, letter, "reasoned")
    return f"{colour.capitalize()}, so {letter}."


def rewrite(src: Path, dst: Path, question_first: bool, mcq_reasoned: str | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name == "und.jsonl" or (dst / entry.name).exists():
            continue
        os.symlink(entry.resolve(), dst / entry.name)
    moved = reasoned = 0
    with (src / "und.jsonl").open() as f, (dst / "und.jsonl").open("w") as out:
        for line in f:
            record = json.loads(line)
            turns = [dict(t) for t in record["conversations"]]
            if question_first:
                turns = question_first_turns(turns)
                moved += turns[0]["value"] != record["conversations"][0]["value"]
            if mcq_reasoned and record["qtype"] == "mcq":
                turns[1]["value"] = reasoned_mcq_answer(record, mcq_reasoned)
                reasoned += 1
            out.write(json.dumps({**record, "conversations": turns}) + "\n")
    print(f"{dst / 'und.jsonl'}: picture after the question in {moved} records, reasoned answers: {reasoned}")


def evaluate(
    model: Path, data: Path, n: int, order: str, show: int = 0, qtype: str | None = None
) -> dict[str, float]:
    from orion_mllm.eval import shapes_und_edit
    from orion_mllm.eval.model_eval import answer_many, read_jsonl
    from orion_mllm.inference.pipeline import OrionPipeline
    from orion_mllm.workflow.evaluate import SHAPES_IMAGE_SEPARATOR

    records = read_jsonl(data / "und.jsonl")[:n]
    questions = list(shapes_und_edit.understanding_questions(records, question_first=order == "first"))
    pipe = OrionPipeline.load(model, image_separator=SHAPES_IMAGE_SEPARATOR)  # as orion eval shapes-und
    answers = answer_many(pipe, [(data / q["image"], q["turns"]) for q in questions], desc="shapes-und")
    judged = [(q, shapes_und_edit.answer_is_right(q, a)) for q, a in zip(questions, answers, strict=True)]
    if show:
        picked = [(q, a, r) for (q, r), a in zip(judged, answers, strict=True) if qtype in (None, q["qtype"])]
        for q, a, _ in picked[:show]:
            print(f"{q['qtype']:9} {q['turns'][-1]['value']!r} gold {q['gold']!r} -> {a!r}")
        share = sum(r for *_, r in picked) / max(len(picked), 1)
        print(f"{len(picked)} questions{f' of type {qtype}' if qtype else ''}, {share:.3f} right one by one")
    return shapes_und_edit.accuracy_by_qtype(judged)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rw = sub.add_parser("rewrite")
    rw.add_argument("src", type=Path)
    rw.add_argument("dst", type=Path)
    rw.add_argument("--question-first", action="store_true", help="the picture after the first question")
    rw.add_argument(
        "--mcq-reasoned", choices=("short", "sentence"), default=None,
        help="multiple choice answered 'Red, so B.' (short) or 'The star is red, so B.' (sentence)",
    )  # fmt: skip
    ev = sub.add_parser("eval")
    ev.add_argument("--model", required=True, type=Path)
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--order", choices=("first", "after"), default="first")
    ev.add_argument("--show", type=int, default=0, help="print this many questions with their answers")
    ev.add_argument("--qtype", default=None, help="with --show: only questions of this type (e.g. mcq)")
    args = ap.parse_args()
    if args.cmd == "rewrite":
        rewrite(args.src, args.dst, args.question_first, args.mcq_reasoned)
    else:
        result = evaluate(args.model, args.data, args.n, args.order, args.show, args.qtype)
        print(json.dumps({"model": str(args.model), "order": args.order, "records": args.n, **result}))


if __name__ == "__main__":
    main()
