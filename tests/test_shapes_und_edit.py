"""shapes-und / shapes-edit scoring with oracle, biased and wrong 'models'."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orion_mllm.data.shapes.datasets import write_shapes_dataset
from orion_mllm.data.shapes.render import render_scene
from orion_mllm.data.shapes.world import Scene
from orion_mllm.eval.shapes_und_edit import (
    caption_pairs,
    mcq_letter,
    normalise,
    score_edits,
    score_understanding,
)
from orion_mllm.images import load_image


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sw")
    write_shapes_dataset(
        out, size=64, n_und=120, n_gen=0, n_edit=40, n_interleaved=0, n_heldout=0, progress=False
    )
    return out


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def oracle_answer(records: list[dict], root: Path):
    by_image = {root / r["image"]: r for r in records}

    def answer(image: Path, conv: list[dict]) -> str:
        record = by_image[image]
        question = conv[-1]["value"]
        if "\nA. " in question:
            shape = re.search(r"What colour is the (\w+)\?", question).group(1)
            colour = next(o["colour"] for o in record["scene"]["objects"] if o["shape"] == shape)
            return dict((opt, letter) for letter, opt in re.findall(r"^([ABCD])\. (\w+)$", question, re.M))[
                colour
            ]
        if record["qtype"] == "caption":
            return record["answer"]
        return record["answers"][len(conv) // 2]

    return answer


def test_oracle_scores_one_and_circular_mcq_defeats_always_a(data):
    records = load(data / "und.jsonl")
    perfect = score_understanding(records, data, oracle_answer(records, data))
    assert perfect["overall"] == 1.0 and perfect["questions"] >= 120
    assert {"mcq", "caption"} <= set(perfect)
    biased = score_understanding([r for r in records if r["qtype"] == "mcq"], data, lambda image, conv: "A")
    assert biased["mcq"] == 0.0  # non-circular scoring would give this model about 25%
    wrong = score_understanding(records, data, lambda image, conv: "Purple.")
    assert wrong["overall"] < 0.3


def test_answer_normalisation_helpers():
    assert normalise("A Red circle!") == "red circle"
    assert mcq_letter("The answer is B.") == "B" and mcq_letter("none") is None
    assert caption_pairs("A small red circle and a blue star.") == {("red", "circle"): 1, ("blue", "star"): 1}


def test_edit_scoring_oracle_identity_and_wrong(data):
    records = load(data / "edit.jsonl")
    assert {r["op"] for r in records} == {"recolour", "add", "remove", "move", "swap"}
    oracle = score_edits(
        records,
        data,
        lambda src, instr: render_scene(Scene.from_dict(by_src(records, data, src)["scene"]), 64),
    )
    assert oracle["overall"] == 1.0
    identity = score_edits(records, data, lambda src, instr: load_image(src))
    assert identity["overall"] <= 0.05


def by_src(records: list[dict], root: Path, src: Path) -> dict:
    return next(r for r in records if root / r["images"][0] == src)


def test_mcq_letter_ignores_articles():
    assert mcq_letter("I think it is a red one, so B") == "B"
    assert mcq_letter("(C) green") == "C"
    assert mcq_letter("D") == "D"


def test_move_edits_are_judged_by_direction(data):
    from orion_mllm.data.shapes.world import ShapeObject, fits_in_scene
    from orion_mllm.eval.shapes_und_edit import edit_correct

    checked = 0
    moves = [r for r in load(data / "edit.jsonl") if r["op"] == "move"]
    assert moves
    for r in moves:
        source, target = Scene.from_dict(r["source"]), Scene.from_dict(r["scene"])
        k = next(i for i, (a, b) in enumerate(zip(source.objects, target.objects, strict=True)) if a != b)
        a, b = source.objects[k], target.objects[k]
        # Three quarters of the way: right direction, not at the exact edge spot.
        part = ShapeObject(b.shape, b.colour, b.size, a.x + 0.75 * (b.x - a.x), a.y + 0.75 * (b.y - a.y))
        partial = Scene(tuple(part if i == k else o for i, o in enumerate(source.objects)))
        if fits_in_scene(part, [o for i, o in enumerate(source.objects) if i != k]):  # else it would collide
            assert edit_correct(r, render_scene(partial, 64))
            checked += 1
        assert edit_correct(r, render_scene(target, 64))
        assert not edit_correct(r, render_scene(source, 64))
    assert checked >= 1
