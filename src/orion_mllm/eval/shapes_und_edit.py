"""``shapes-und`` and ``shapes-edit`` scoring: model answers and edited images judged against the scene.

Both take the records ``orion data shapes`` writes (``und.jsonl`` / ``edit.jsonl``) and a callable
standing for the model, so any model (ours through the inference engine, or another one) can be
scored the same way:

- understanding: ``answer(image_path, conversation) -> str`` where ``conversation`` is the
  LLaVA-form turns so far, ending with the question. Multiple choice uses MMBench's circular
  evaluation: the question is asked once per rotation of the options, and counts as right only if
  every rotation is answered with the letter of the correct option. Short answers are compared
  after normalisation (case, punctuation, leading article). Captions are right when their first
  sentence names exactly the scene's colour-shape pairs (with multiplicity). Dialogue turns are
  asked with the gold history. The picture comes before the first question (LLaVA's order, as
  ShapesWorld writes by default) or, for a model trained with ``question_first``, after it.
- editing: ``edit(source_image_path, instruction) -> PIL image``. Right when the output's detected
  objects are exactly the target scene's (colour, shape) multiset and every object that the
  instruction does not let move sits within ``position_tolerance`` of its target centre (an added
  object's position is free).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from orion_mllm.data.shapes.datasets import ask_about_image, format_mcq, question_of
from orion_mllm.data.shapes.scorer import Detection, detect_objects
from orion_mllm.data.shapes.world import COLOURS, SHAPES, Scene

AnswerFn = Callable[[Path, list[dict[str, str]]], str]
EditFn = Callable[[Path, str], Image.Image]


def normalise(text: str) -> str:
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower())
    words = text.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def mcq_letter(text: str) -> str | None:
    """The option letter a free-form answer chose (MMBench-style extraction).

    A leading letter ("B", "B.", "(B) red") wins; otherwise a lone capital A-D anywhere. Case is kept,
    so the article "a" in "it is a red one" is not read as option A.
    """
    text = text.strip()
    match = re.match(r"^\(?([ABCD])(?:[).:\s]|$)", text) or re.search(r"\b([ABCD])\b", text)
    return match.group(1) if match else None


def caption_pairs(text: str) -> Counter:
    """(colour, shape) pairs named in a caption."""
    words = normalise(text).split()
    pairs: Counter = Counter()
    for i, word in enumerate(words[:-1]):
        nxt = words[i + 1]
        if word in COLOURS and nxt in SHAPES:
            pairs[(word, nxt)] += 1
        elif word in COLOURS and i + 2 < len(words) and words[i + 2] in SHAPES:  # "red small circle"
            pairs[(word, words[i + 2])] += 1
    return pairs


def understanding_questions(
    records: Iterable[dict[str, Any]], question_first: bool = False
) -> Iterator[dict[str, Any]]:
    """Every question ``shapes-und`` asks, in order, as plain data (what the lmms-eval task's documents
    hold too): ``qtype``; ``group`` (the questions that count as one: a multiple-choice record's
    rotations, which are right only together); ``image`` (the record's path, relative to its folder);
    ``turns`` (LLaVA-form, ending with the question; earlier answers gold; the picture before the first
    question, or after it with ``question_first``, whichever order the records were written in); and
    what a right answer is: ``gold`` (the option letter for ``mcq``, the answer for short answers) or,
    for a caption, ``scene``."""
    for record in records:
        image, turns = record["image"], [dict(t) for t in record["conversations"]]
        turns[0]["value"] = ask_about_image(question_of(turns[0]["value"]), question_first)
        if record["qtype"] == "mcq":
            question = question_of(turns[0]["value"]).split("\nA. ")[0]
            options = list(record["options"])
            gold = options["ABCD".index(record["answer"])]
            for shift in range(len(options)):
                rotated = options[shift:] + options[:shift]
                yield {
                    "qtype": "mcq", "group": f"{record['id']}/mcq", "image": image,
                    "turns": [{"from": "human", "value": ask_about_image(format_mcq(question, rotated),
                                                                         question_first)}],
                    "gold": "ABCD"[rotated.index(gold)], "scene": None,
                }  # fmt: skip
            continue
        if record["qtype"] == "caption":
            yield {"qtype": "caption", "group": f"{record['id']}/caption", "image": image,
                   "turns": [dict(turns[0])], "gold": None, "scene": record["scene"]}  # fmt: skip
            continue
        for k, qtype in enumerate(record.get("qtypes", [record["qtype"]])):
            yield {
                "qtype": qtype, "group": f"{record['id']}/{k}", "image": image,
                "turns": [dict(t) for t in turns[: 2 * k + 1]], "gold": turns[2 * k + 1]["value"],
                "scene": None,
            }  # fmt: skip


def answer_is_right(question: dict[str, Any], answer: str) -> bool:
    """Whether ``answer`` is right for one of :func:`understanding_questions`' questions: the option
    letter for multiple choice (MMBench-style extraction), the scene's colour-shape pairs in a
    caption's first sentence (the training format; later sentences restate relations), else the
    normalised gold answer."""
    if question["qtype"] == "mcq":
        return mcq_letter(answer) == question["gold"]
    if question["qtype"] == "caption":
        scene = Scene.from_dict(question["scene"])
        return caption_pairs(answer.split(".")[0]) == Counter((o.colour, o.shape) for o in scene.objects)
    return normalise(answer) == normalise(question["gold"])


def accuracy_by_qtype(judged: Iterable[tuple[dict[str, Any], bool]]) -> dict[str, float]:
    """Per question type the share of groups answered right (a group: every question in it right),
    ``overall`` = mean of the types, ``questions`` = groups counted."""
    groups: dict[str, tuple[str, bool]] = {}
    for question, right in judged:
        qtype, so_far = groups.get(question["group"], (question["qtype"], True))
        groups[question["group"]] = (qtype, so_far and right)
    hits: dict[str, list[bool]] = {}
    for qtype, right in groups.values():
        hits.setdefault(qtype, []).append(right)
    return _accuracy_by_group(hits, "questions")


def score_understanding(
    records: Iterable[dict[str, Any]], root: str | Path, answer: AnswerFn, question_first: bool = False
) -> dict[str, float]:
    """Accuracy per question type (``mcq`` circular, short answers, captions), ``overall`` = mean of types;
    ``question_first``: the picture after the first question (:func:`understanding_questions`)."""
    root = Path(root)
    return accuracy_by_qtype(
        (q, answer_is_right(q, answer(root / q["image"], q["turns"])))
        for q in understanding_questions(records, question_first)
    )


def _accuracy_by_group(hits: dict[str, list[bool]], count_key: str) -> dict[str, float]:
    """Accuracy per group, ``overall`` = mean of the groups, and the number of items under ``count_key``."""
    result = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    result["overall"] = sum(result.values()) / len(result) if result else 0.0
    result[count_key] = sum(len(v) for v in hits.values())
    return result


def _objects_present(
    dets: Sequence[Detection], target: Scene, free: set[int], position_tolerance: float
) -> bool:
    """Same (colour, shape) multiset as ``target``, and every object not in ``free`` near its place."""
    if Counter((d.colour, d.shape) for d in dets) != Counter((o.colour, o.shape) for o in target.objects):
        return False
    for k, obj in enumerate(target.objects):
        if k in free:
            continue
        near = [
            d for d in dets
            if (d.colour, d.shape) == (obj.colour, obj.shape)
            and abs(d.cx - obj.x) <= position_tolerance and abs(d.cy - obj.y) <= position_tolerance
        ]  # fmt: skip
        if not near:
            return False
    return True


def scene_matches(image: Image.Image, scene: Scene | dict[str, Any], position_tolerance: float = 0.1) -> bool:
    """Whether ``image`` shows exactly ``scene``'s objects (colour, shape, count), each near its position."""
    target = Scene.from_dict(scene) if isinstance(scene, dict) else scene
    return _objects_present(detect_objects(image), target, set(), position_tolerance)


def edit_correct(record: dict[str, Any], output: Image.Image, position_tolerance: float = 0.1) -> bool:
    """Whether ``output`` shows the record's target scene (see module docstring)."""
    target = Scene.from_dict(record["scene"])
    dets = detect_objects(output)
    free = {len(target.objects) - 1} if record["op"] == "add" else set()
    if record["op"] == "move":
        # "Move X to the left" is right if X went clearly that way; the exact edge spot is not required.
        source = Scene.from_dict(record["source"])
        k = next(i for i, (a, b) in enumerate(zip(source.objects, target.objects, strict=True)) if a != b)
        if not _moved_towards(source.objects[k], target.objects[k], dets, position_tolerance):
            return False
        free.add(k)
    return _objects_present(dets, target, free, position_tolerance)


def _moved_towards(before, after, dets, tolerance: float) -> bool:
    """Some detection of the object moved at least half the way along the instructed axis, not off it."""
    dx, dy = after.x - before.x, after.y - before.y
    for d in dets:
        if (d.colour, d.shape) != (after.colour, after.shape):
            continue
        mx, my = d.cx - before.x, d.cy - before.y
        if abs(dx) >= abs(dy):
            ok = mx * dx > 0 and abs(mx) >= abs(dx) / 2 and abs(d.cy - after.y) <= tolerance
        else:
            ok = my * dy > 0 and abs(my) >= abs(dy) / 2 and abs(d.cx - after.x) <= tolerance
        if ok:
            return True
    return False


def score_edits(records: Iterable[dict[str, Any]], root: str | Path, edit: EditFn) -> dict[str, float]:
    """Accuracy per edit operation and ``overall`` (mean over operations)."""
    root = Path(root)
    hits: dict[str, list[bool]] = {}
    for record in records:
        output = edit(root / record["images"][0], record["instruction"])
        hits.setdefault(record["op"], []).append(edit_correct(record, output))
    return _accuracy_by_group(hits, "edits")


__all__ = [
    "caption_pairs",
    "edit_correct",
    "mcq_letter",
    "normalise",
    "score_edits",
    "score_understanding",
]
