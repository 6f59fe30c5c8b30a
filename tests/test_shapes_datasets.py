"""ShapesWorld datasets: determinism, format validity, held-out split, answers that match the scene."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from orion_mllm.cli import main
from orion_mllm.data.check import check_jsonl
from orion_mllm.data.shapes.datasets import (
    HELD_OUT_COUNT,
    HELD_OUT_PAIRS,
    NUMBER_WORDS,
    VAGUE_REQUESTS,
    canonical_caption,
    is_held_out_caption,
    plural,
    write_shapes_dataset,
)
from orion_mllm.data.shapes.scorer import CATEGORIES, Spec, detect_objects, judge
from orion_mllm.data.shapes.world import SHAPES, Scene
from orion_mllm.data.templates import COMMAND, POLITE, QUESTION
from orion_mllm.images import load_image

SMALL = {"n_und": 60, "n_gen": 60, "n_edit": 25, "n_interleaved": 10, "n_heldout": 10}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sw")
    write_shapes_dataset(out, size=64, seed=3, progress=False, **SMALL)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    write_shapes_dataset(tmp_path, size=64, seed=3, progress=False, **SMALL)
    assert tree_digest(tmp_path) == tree_digest(dataset)
    other = tmp_path / "other"
    write_shapes_dataset(other, size=64, seed=4, progress=False, **SMALL)
    assert (other / "gen.jsonl").read_bytes() != (dataset / "gen.jsonl").read_bytes()


def test_every_file_passes_data_check(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    expected = {
        "und.jsonl": "understanding",
        "gen.jsonl": "generation",
        "edit.jsonl": "editing",
        "interleaved.jsonl": "generation",
        "heldout_gen.jsonl": "generation",
        "draw_ask.jsonl": "generation",
    }
    for name, task in expected.items():
        report = check_jsonl(dataset / name, decode=True)
        assert report.ok, report.problems[:5]
        assert report.tasks[task] == report.records == meta["counts"][name.removesuffix(".jsonl")]


def test_held_out_captions_never_in_training(dataset):
    """The default hold-out: about a fifth of the captions (a fixed rule on their text) never occur in
    gen.jsonl, while what they name does (pairs and four-of-a-shape train); heldout_gen.jsonl asks
    for exactly those captions."""
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["holdout"] == meta["settings"]["holdout"] == "captions" and meta["held_out_pairs"] == []
    gen = records(dataset / "gen.jsonl")
    assert not [r["caption"] for r in gen if is_held_out_caption(r["caption"])]
    held = records(dataset / "heldout_gen.jsonl")
    assert held and all(is_held_out_caption(r["caption"]) for r in held)
    assert all(r["caption"] == canonical_caption(Spec.from_dict(r["spec"])) for r in held)
    assert {r["category"] for r in held} == set(CATEGORIES)
    # The rule is a fixed function of the text (case and a final full stop aside), about one in five.
    from orion_mllm.eval.shapes_gen import prompt_set

    captions = {p.prompt.removeprefix("a photo of ") for p in prompt_set()}
    share = sum(map(is_held_out_caption, captions)) / len(captions)
    assert 0.1 < share < 0.3
    assert all(is_held_out_caption(c) == is_held_out_caption(c.capitalize() + ".") for c in captions)
    # Nothing else is held out: a held-out pair of the older design and four of a shape do train.
    big = dataset.parent / "sw-big"
    write_shapes_dataset(big, size=48, seed=3, progress=False, n_und=400, n_gen=400, n_edit=0,
                         n_interleaved=0, n_heldout=0)  # fmt: skip
    training = (big / "und.jsonl").read_text() + (big / "gen.jsonl").read_text()
    assert any(f"{c} {s}" in training for c, s in HELD_OUT_PAIRS) and '"count": 4' in training


def test_pairs_holdout_keeps_pairs_and_four_out_of_every_training_file(tmp_path):
    """The older design (``holdout="pairs"``), kept so earlier runs can be reproduced."""
    dataset = tmp_path / "pairs"
    write_shapes_dataset(dataset, size=64, seed=3, progress=False, holdout="pairs", **SMALL)
    training = "\n".join((dataset / f).read_text() for f in ("und.jsonl", "gen.jsonl", "edit.jsonl")).lower()
    for colour, shape in HELD_OUT_PAIRS:
        assert f"{colour} {shape}" not in training
        assert f'"colour": "{colour}", "shape": "{shape}"' not in training  # not even in a scene
    assert f"{NUMBER_WORDS[HELD_OUT_COUNT]} " not in training.replace("four objects", "")
    held = records(dataset / "heldout_gen.jsonl")
    text = " ".join(r["caption"] for r in held)
    assert any(f"{c} {s}" in text for c, s in HELD_OUT_PAIRS) and NUMBER_WORDS[HELD_OUT_COUNT] in text


def test_generation_records_cover_categories_and_templates(dataset):
    gen = records(dataset / "gen.jsonl")
    assert {r["category"] for r in gen} == set(CATEGORIES)
    assert len(POLITE) >= 10 and len(COMMAND) >= 10 and len(QUESTION) >= 10
    for r in gen:
        prompt = r["conversations"][0]["value"]
        assert r["caption"] in prompt
        # The stored image satisfies the stored spec, judged from pixels.
        assert judge(Spec.from_dict(r["spec"]), load_image(dataset / r["image"]))


def test_draw_then_ask_dialogues_answer_from_their_picture_only(dataset):
    gen = {r["id"]: r for r in records(dataset / "gen.jsonl")}
    asks = records(dataset / "draw_ask.jsonl")
    assert len(asks) == len(gen) == json.loads((dataset / "meta.json").read_text())["counts"]["draw_ask"]
    absent = 0
    for r in asks:
        source = gen[r["id"].replace("drawask-", "gen-")]
        assert r["image"] == source["image"] and r["scene"] == source["scene"]  # the record's own picture
        request, image, question, answer = (t["value"] for t in r["conversations"])
        assert request in VAGUE_REQUESTS and image == "<image>"  # the request names nothing
        shape = {plural(s): s for s in SHAPES}[re.fullmatch(r"How many (\w+) are there\?", question).group(1)]
        dets = detect_objects(load_image(dataset / r["image"]))  # the answer is what the pixels show
        assert answer == r["answer"] == str(sum(d.shape == shape for d in dets))
        absent += answer == "0"
    assert 0.3 < absent / len(asks) < 0.7  # shapes the picture holds and shapes it does not


def test_understanding_answers_match_the_pixels(dataset):
    und = records(dataset / "und.jsonl")
    kinds = {r["qtype"] for r in und}
    assert {"caption", "mcq", "dialogue"} <= kinds and len(
        kinds & {"colour", "shape", "count", "existence", "position"}
    ) >= 4
    for r in und:
        scene = Scene.from_dict(r["scene"])
        dets = detect_objects(load_image(dataset / r["image"]))
        assert sorted((d.colour, d.shape) for d in dets) == sorted((o.colour, o.shape) for o in scene.objects)
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2], strict=True):
            if m := re.match(r"(?:<image>\n)?How many (\w+) are there\?", q["value"]):
                shape = {plural(s): s for s in SHAPES}[m.group(1)]
                assert int(a["value"]) == sum(o.shape == shape for o in scene.objects)
            if m := re.match(r"(?:<image>\n)?What colour is the (\w+)\?$", q["value"]):
                assert (
                    a["value"]
                    == next(o.colour for o in scene.objects if o.shape == m.group(1)).capitalize() + "."
                )
        if r["qtype"] == "mcq":
            assert r["answer"] in "ABCD" and len(r["options"]) == 4


def test_edits_change_what_the_instruction_says(dataset):
    for r in records(dataset / "edit.jsonl"):
        src = [(o["colour"], o["shape"]) for o in r["source"]["objects"]]
        tgt = [(o["colour"], o["shape"]) for o in r["scene"]["objects"]]
        if r["op"] == "remove":
            assert len(tgt) == len(src) - 1
        elif r["op"] == "add":
            assert len(tgt) == len(src) + 1 and tgt[:-1] == src
        elif r["op"] == "recolour":
            assert sum(a != b for a, b in zip(src, tgt, strict=True)) == 1
        else:  # move / swap keep identities, change positions
            assert tgt == src and r["source"] != r["scene"]


def test_cli_writes_and_rejects_bad_size(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "shapes",
                "--out",
                str(tmp_path),
                "--size",
                "48",
                "--n-und",
                "3",
                "--n-gen",
                "6",
                "--n-edit",
                "5",
                "--n-interleaved",
                "1",
                "--n-heldout",
                "2",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gen"] == 6
    assert main(["data", "shapes", "--out", str(tmp_path / "x"), "--size", "16"]) == 2
    assert "32 to 512" in capsys.readouterr().err


def test_questions_are_unambiguous(dataset):
    from orion_mllm.data.shapes.world import relation_holds

    for r in records(dataset / "und.jsonl"):
        scene = Scene.from_dict(r["scene"])
        asked = [t["value"] for t in r["conversations"][::2]]
        assert len(set(asked)) == len(asked) or r["qtypes"].count("count") == len(asked)
        for q, a in zip(asked, r["conversations"][1::2], strict=True):
            if m := re.search(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q):
                obj = {(o.colour, o.shape): o for o in scene.objects}
                rel = a["value"].rstrip(".").lower()
                assert relation_holds(obj[m.group(1), m.group(2)], obj[m.group(3), m.group(4)], rel)
    for r in records(dataset / "interleaved.jsonl"):
        named = {o["shape"] for o in r["spec"]["objects"]}
        shape = {plural(s): s for s in SHAPES}[
            re.match(r"How many (\w+)", r["conversations"][2]["value"]).group(1)
        ]
        assert shape in named or r["answer"] == "0"


def test_negative_counts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_edit=-1"):
        write_shapes_dataset(tmp_path, n_edit=-1, progress=False)


def test_canonical_generation_targets_are_a_function_of_the_caption(dataset, tmp_path):
    """Default layout: one picture per caption (MSE regression learns a mean, so it must be unique),
    every target satisfies its caption, and the random layout stays available for decoder data."""
    from orion_mllm.data.shapes.datasets import DEFAULT_COLOUR

    records = [json.loads(line) for line in (dataset / "gen.jsonl").read_text().splitlines()]
    assert json.loads((dataset / "meta.json").read_text())["gen_layout"] == "canonical"
    by_caption: dict[str, bytes] = {}
    for r in records:
        spec = Spec.from_dict(r["spec"])
        image = load_image(dataset / r["image"])
        assert judge(spec, image), r["caption"]
        pixels = image.tobytes()
        assert by_caption.setdefault(r["caption"], pixels) == pixels, r["caption"]
        for o in r["scene"]["objects"]:  # a colour the caption does not name is the shape's default
            if o["colour"] not in r["caption"]:
                assert o["colour"] == DEFAULT_COLOUR[o["shape"]]
    assert len(by_caption) < len(records)  # captions repeat, with the same picture each time
    assert not set(DEFAULT_COLOUR.items()) & {(s, c) for c, s in HELD_OUT_PAIRS}  # pairs hold-out: none out

    write_shapes_dataset(tmp_path, size=64, seed=3, progress=False, gen_layout="random", **SMALL)
    free = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    positions = {(o["x"], o["y"]) for r in free for o in r["scene"]["objects"]}
    assert len(positions) > 50  # free layouts: positions vary
    with pytest.raises(ValueError, match="gen_layout"):
        write_shapes_dataset(tmp_path / "x", gen_layout="tidy", **SMALL)


def test_a_scene_no_drawn_question_fits_falls_back_to_counting():
    """A one-object scene cannot support position questions: after 20 such draws the record asks a
    count question instead (the fallback path, under either hold-out)."""
    import random

    from orion_mllm.data.shapes.datasets import QUESTION_TYPES, Holdout, understanding_record
    from orion_mllm.data.shapes.world import ShapeObject

    class AlwaysPosition(random.Random):
        def choice(self, seq):
            if tuple(seq) == QUESTION_TYPES:
                return "position"
            return "short" if "short" in seq else super().choice(seq)

    scene = Scene((ShapeObject("star", "red", "medium", 0.5, 0.5),))
    for name in ("captions", "pairs"):
        record = understanding_record(AlwaysPosition(0), scene, "x.png", 0, Holdout.named(name))
        assert record["qtype"] == "count" and record["answer"] in {"0", "1"}


def test_holdout_names_agree_in_generator_recipe_and_cli():
    """The hold-out names live in three layers (generator, recipe schema, CLI): they must agree."""
    import argparse
    import typing

    from orion_mllm.cli import build_parser
    from orion_mllm.data.shapes.datasets import HOLDOUTS
    from orion_mllm.train.recipe import ShapesDataSection

    assert set(typing.get_args(ShapesDataSection.model_fields["holdout"].annotation)) == set(HOLDOUTS)
    parser = build_parser()
    for name in ("data", "shapes"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    option = next(a for a in parser._actions if a.dest == "holdout")
    assert set(option.choices) == set(HOLDOUTS) and option.default == HOLDOUTS[0] == "captions"


def test_caption_order_options(dataset, tmp_path):
    """``caption_order``: "scene" is the captions as before the option (the default); the sorted orders
    list the same objects, by shape or by colour, "split" by shape only for the shapes request; only
    captions change, and the folder records the setting."""
    from orion_mllm.data.shapes.datasets import CAPTION_ORDERS, caption_objects, describe_scene
    from orion_mllm.data.shapes.world import COLOURS

    colours = list(COLOURS)
    base = records(dataset / "und.jsonl")
    captions = [r for r in base if r["qtype"] == "caption"]
    assert captions and all(
        r["answer"] == describe_scene(Scene.from_dict(r["scene"])) for r in captions
    )  # default: the scene's order
    for order in CAPTION_ORDERS[1:]:
        out = tmp_path / order
        meta = write_shapes_dataset(out, size=64, seed=3, progress=False, caption_order=order, **SMALL)
        assert meta["settings"]["caption_order"] == order
        mine = records(out / "und.jsonl")
        assert len(mine) == len(base)
        for old, new in zip(base, mine, strict=True):
            if old["qtype"] != "caption":
                assert new == old
                continue
            assert new["answer"] == new["conversations"][1]["value"]
            prompt = new["conversations"][0]["value"]
            listed = caption_objects(Scene.from_dict(new["scene"]), order, prompt)
            assert sorted(map(repr, listed)) == sorted(map(repr, Scene.from_dict(old["scene"]).objects))
            asks_shapes = prompt.endswith("Describe the shapes you see.")
            by_shape = order == "shape" or (order == "split" and asks_shapes)
            keys = [
                (SHAPES.index(o.shape), colours.index(o.colour)) if by_shape else
                (colours.index(o.colour), SHAPES.index(o.shape))
                for o in listed
            ]  # fmt: skip
            assert keys == sorted(keys)
            first = new["answer"].split(".")[0].lower()
            positions = [first.index(f"{o.colour} {o.shape}") for o in listed]
            assert positions == sorted(positions)  # the caption names them in that order
    with pytest.raises(ValueError, match="caption_order='size'"):
        write_shapes_dataset(tmp_path / "bad", size=64, seed=3, progress=False, caption_order="size", **SMALL)


def _names_agree(setting: str, names: tuple[str, ...], recipe_default: str, cli_default: str) -> None:
    """A generator setting's names are the same in the generator, the recipe schema and `orion data
    shapes`, with the given defaults."""
    import argparse
    import typing

    from orion_mllm.cli import build_parser
    from orion_mllm.train.recipe import ShapesDataSection

    field = ShapesDataSection.model_fields[setting]
    assert set(typing.get_args(field.annotation)) == set(names) and field.default == recipe_default
    parser = build_parser()
    for name in ("data", "shapes"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    option = next(a for a in parser._actions if a.dest == setting)
    assert set(option.choices) == set(names) and option.default == cli_default


def test_caption_order_names_agree_in_generator_recipe_and_cli():
    from orion_mllm.data.shapes.datasets import CAPTION_ORDERS

    _names_agree("caption_order", CAPTION_ORDERS, "scene", "scene")


def test_canonical_add_places_the_new_object_by_rule(dataset, tmp_path):
    """``add_layout="canonical"`` (the generator's default): an "add" edit's new object is small and on
    the first free slot, so the target is a function of the source and the words; every other record
    is the same as with ``random`` (the folder before the option), which records its setting."""
    from orion_mllm.data.shapes.datasets import _ADD_SLOTS, canonical_addition
    from orion_mllm.data.shapes.world import fits_in_scene
    from orion_mllm.eval.shapes_und_edit import scene_matches

    n = {**SMALL, "n_edit": 60}
    canonical = write_shapes_dataset(tmp_path / "c", size=64, seed=5, progress=False, **n)
    legacy = write_shapes_dataset(tmp_path / "r", size=64, seed=5, progress=False, add_layout="random", **n)
    assert canonical["settings"]["add_layout"] == "canonical" and legacy["settings"]["add_layout"] == "random"
    mine, old = records(tmp_path / "c" / "edit.jsonl"), records(tmp_path / "r" / "edit.jsonl")
    adds = 0
    for new, before in zip(mine, old, strict=True):
        if new["op"] != "add":
            assert new == before
            continue
        adds += 1
        assert new["instruction"] == before["instruction"] and new["source"] == before["source"]
        source = Scene.from_dict(new["source"])
        added = Scene.from_dict(new["scene"]).objects[-1]
        assert Scene.from_dict(new["scene"]).objects[:-1] == source.objects
        expected = canonical_addition(source, added.shape, added.colour)
        assert expected is not None and added == expected and added.size == "small"
        assert fits_in_scene(added, source.objects)
        earlier = _ADD_SLOTS[: _ADD_SLOTS.index((added.x, added.y))]  # no earlier slot was free
        assert not any(
            fits_in_scene(type(added)(added.shape, added.colour, "small", x, y), source.objects)
            for x, y in earlier
        )
        # The picture shows the target scene.
        assert scene_matches(load_image(tmp_path / "c" / new["images"][1]), new["scene"])
    assert adds >= 10
    # Nothing but edit.jsonl and the add targets' pictures differ.
    a, b = tree_digest(tmp_path / "c"), tree_digest(tmp_path / "r")
    differ = {k for k in a if a[k] != b.get(k)}
    assert differ and all(k == "edit.jsonl" or k == "meta.json" or k.endswith("_tgt.png") for k in differ)
    with pytest.raises(ValueError, match="add_layout='corner'"):
        write_shapes_dataset(tmp_path / "bad", size=64, seed=3, progress=False, add_layout="corner", **SMALL)


def test_add_layout_names_agree_in_generator_recipe_and_cli():
    from orion_mllm.data.shapes.datasets import ADD_LAYOUTS

    # A recipe that does not say means the folders before the option (random); the CLI writes canonical.
    _names_agree("add_layout", ADD_LAYOUTS, "random", "canonical")


def test_each_file_depends_only_on_its_recorded_settings(dataset, tmp_path):
    """``FILE_SETTINGS``: changing a setting a file is not listed under leaves the file and its pictures
    byte for byte (what lets a committed base ignore settings its data never read)."""
    from orion_mllm.data.shapes.datasets import FILE_SETTINGS, SETTINGS

    base = {"size": 64, "seed": 3, "gen_layout": "canonical", "holdout": "captions", "caption_order": "scene",
            "add_layout": "canonical", "question_first": False, "mcq_answer": "letter", **SMALL}  # fmt: skip
    assert set(base) == set(SETTINGS)
    other = {"size": 48, "seed": 4, "gen_layout": "random", "holdout": "pairs", "caption_order": "split",
             "add_layout": "random", "question_first": True, "mcq_answer": "reasoned", "n_und": 61,
             "n_gen": 61, "n_edit": 26, "n_interleaved": 11, "n_heldout": 11}  # fmt: skip

    def contents(root: Path, name: str) -> list[tuple[str, list[str]]]:
        out = []
        for line in (root / name).read_text().splitlines():
            rec = json.loads(line)
            pics = rec.get("images") or [rec["image"]]
            out.append((line, [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in pics]))
        return out

    for setting in SETTINGS:
        changed = tmp_path / setting
        write_shapes_dataset(changed, progress=False, **{**base, setting: other[setting]})
        for name, depends in FILE_SETTINGS.items():
            if setting not in depends:
                assert contents(changed, name) == contents(dataset, name), (name, setting)
    # And each listed dependency is real for the file that names a layout or order.
    assert contents(tmp_path / "caption_order", "und.jsonl") != contents(dataset, "und.jsonl")
    assert contents(tmp_path / "question_first", "und.jsonl") != contents(dataset, "und.jsonl")
    assert contents(tmp_path / "mcq_answer", "und.jsonl") != contents(dataset, "und.jsonl")
    assert contents(tmp_path / "add_layout", "edit.jsonl") != contents(dataset, "edit.jsonl")
    assert contents(tmp_path / "gen_layout", "gen.jsonl") != contents(dataset, "gen.jsonl")


def test_question_first_and_reasoned_answers_change_only_the_wording(dataset, tmp_path):
    """``question_first`` moves the picture after the first question, ``mcq_answer="reasoned"`` answers
    multiple choice "The star is red, so B."; every record is otherwise the one the defaults write (no
    random draw moves), the letter is still what ``mcq_letter`` reads, and meta.json records both."""
    from orion_mllm.data.shapes.datasets import recorded_settings
    from orion_mllm.eval.shapes_und_edit import mcq_letter

    meta = write_shapes_dataset(
        tmp_path / "q", size=64, seed=3, progress=False, question_first=True, mcq_answer="reasoned", **SMALL
    )
    settings = recorded_settings(meta)
    assert settings["question_first"] is True and settings["mcq_answer"] == "reasoned"
    mine, plain = records(tmp_path / "q" / "und.jsonl"), records(dataset / "und.jsonl")
    kinds = set()
    for new, old in zip(mine, plain, strict=True):
        first_new, first_old = new["conversations"][0]["value"], old["conversations"][0]["value"]
        assert first_old.startswith("<image>\n")
        assert first_new == first_old.removeprefix("<image>\n") + "\n<image>"
        assert new["conversations"][1:] == old["conversations"][1:] or new["qtype"] == "mcq"
        if new["qtype"] == "mcq":
            colour = new["options"]["ABCD".index(new["answer"])]
            answer = new["conversations"][1]["value"]
            assert answer.endswith(f" is {colour}, so {new['answer']}.")
            assert mcq_letter(answer) == new["answer"]
        assert {k: v for k, v in new.items() if k != "conversations"} == {
            k: v for k, v in old.items() if k != "conversations"
        }
        kinds.add(new["qtype"])
    assert {"mcq", "caption", "dialogue"} <= kinds
    # A folder from before the settings existed reads as picture first, letter answers.
    legacy = {k: v for k, v in meta["settings"].items() if k not in ("question_first", "mcq_answer")}
    assert recorded_settings({**meta, "settings": legacy})["question_first"] is False
    with pytest.raises(ValueError, match="mcq_answer='words'"):
        write_shapes_dataset(tmp_path / "bad", size=64, seed=3, progress=False, mcq_answer="words", **SMALL)


def test_mcq_answer_names_agree_in_generator_recipe_and_cli():
    from orion_mllm.data.shapes.datasets import MCQ_ANSWERS

    _names_agree("mcq_answer", MCQ_ANSWERS, "letter", "letter")
