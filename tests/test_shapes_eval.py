"""shapes-gen: fixed prompt set, GenEval layout, oracle self-check, scoring of any folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from orion_mllm.cli import main
from orion_mllm.data.shapes.scorer import CATEGORIES
from orion_mllm.eval.shapes_gen import prompt_set, score_folder, spec_from_metadata, write_oracle


def test_prompt_set_is_fixed_and_large_enough():
    prompts = prompt_set()
    assert len(prompts) >= 550
    assert {p.spec.category for p in prompts} == set(CATEGORIES)
    assert [p.prompt for p in prompts] == [p.prompt for p in prompt_set()]
    # The world is small (6 single-object prompts exist), so prompts repeat within a category;
    # categories stay balanced and overall is their mean, as in GenEval.
    assert len({p.prompt for p in prompts}) > 200


def test_geneval_metadata_round_trips_without_our_spec():
    for p in prompt_set()[::23]:
        meta = p.metadata()
        meta.pop("spec")
        assert spec_from_metadata(meta) == p.spec


def test_oracle_scores_one_and_broken_images_score_lower(tmp_path, capsys):
    assert main(["eval", "shapes-gen", "--oracle", "--out", str(tmp_path / "o"), "--size", "64"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["overall"] >= 0.99 and scores["samples"] >= 550
    assert set(CATEGORIES) <= set(scores)
    # Blank out every other image: accuracy must drop to about half in every category.
    blanked = tmp_path / "b"
    shutil.copytree(tmp_path / "o", blanked)
    for k, folder in enumerate(sorted(blanked.iterdir())):
        if k % 2 == 0:
            Image.new("RGB", (64, 64), "white").save(folder / "samples" / "0000.png")
    assert main(["eval", "shapes-score", "--images", str(blanked)]) == 0
    broken = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.4 <= broken["overall"] <= 0.6


def test_score_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        score_folder(tmp_path / "missing")
    write_oracle(tmp_path / "o", size=32)
    first = sorted((tmp_path / "o").iterdir())[0]
    (first / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl: not a JSON line"):
        score_folder(tmp_path / "o", progress=False)


def test_without_oracle_or_model_the_cli_says_what_is_missing(tmp_path, capsys):
    assert main(["eval", "shapes-gen", "--out", str(Path(tmp_path))]) == 2
    assert "either --model DIR" in capsys.readouterr().err
    assert main(["eval", "shapes-gen", "--oracle", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2


def test_geneval_two_object_tag_and_bad_metadata():
    spec = spec_from_metadata(
        {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "star", "count": 1}]}
    )
    assert spec.category == "two_objects"
    assert prompt_set()[92].metadata()["tag"] == "two_object"
    with pytest.raises(ValueError, match="expected a JSON object"):
        spec_from_metadata(5)
    with pytest.raises(ValueError, match="cannot read a GenEval spec"):
        spec_from_metadata({"spec": {}})


def test_unseen_prompts_are_told_apart_by_why_they_are_unseen(tmp_path):
    """Under the ``captions`` hold-out an unseen caption is held out by the rule or was never drawn by
    the sampler; under ``pairs``, a never-trained colour-shape pair, a never-trained count
    (extrapolation) and a new combination of trained pairs are reported apart. The hold-out is read
    from the folder's meta.json; one written before it was a setting counts as ``pairs``."""
    from orion_mllm.data.shapes.datasets import canonical_caption, is_held_out_caption, write_shapes_dataset
    from orion_mllm.data.shapes.scorer import ObjectSpec, Spec
    from orion_mllm.eval.model_eval import TrainingCaptions, training_captions

    star4 = Spec("counting", [ObjectSpec("star", count=4)])
    orange_cross = Spec("colors", [ObjectSpec("cross", "orange")])
    pair = Spec("color_attr", [ObjectSpec("square", "red"), ObjectSpec("diamond", "green")])
    pairs = TrainingCaptions(frozenset({"three stars"}), "pairs")
    assert pairs.unseen_reason(orange_cross) == "heldout_pair"
    assert pairs.unseen_reason(star4) == "heldout_count"
    assert pairs.unseen_reason(Spec("counting", [ObjectSpec("star", count=3)])) == "new_combination"
    assert pairs.unseen_reason(pair) == "new_combination"
    assert pairs.seen(Spec("counting", [ObjectSpec("star", count=3)])) and not pairs.seen(pair)
    captions = TrainingCaptions(frozenset({"a red circle"}), "captions")
    star, two_squares = (
        Spec("single_object", [ObjectSpec("star")]),
        Spec("counting", [ObjectSpec("square", count=2)]),
    )
    assert is_held_out_caption(canonical_caption(star)) and canonical_caption(two_squares) == "two squares"
    assert captions.unseen_reason(star) == captions.unseen_reason(two_squares) == "held_out_caption"
    for spec in (star4, orange_cross, pair):  # trainable under the caption rule, just never drawn here
        assert captions.unseen_reason(spec) == "new_combination"
    assert captions.seen(Spec("colors", [ObjectSpec("circle", "red")]))
    judged = [(star4, True), (orange_cross, False), (pair, False)]
    assert pairs.unseen_by_reason(judged) == {
        "heldout_count": {"prompts": 1, "accuracy": 1.0},
        "heldout_pair": {"prompts": 1, "accuracy": 0.0},
        "new_combination": {"prompts": 1, "accuracy": 0.0},
    }
    small = {"n_und": 0, "n_gen": 30, "n_edit": 0, "n_interleaved": 0, "n_heldout": 0, "progress": False}
    write_shapes_dataset(tmp_path / "c", size=48, **small)
    write_shapes_dataset(tmp_path / "p", size=48, holdout="pairs", **small)
    assert training_captions(tmp_path / "c/gen.jsonl").holdout == "captions"
    old = json.loads((tmp_path / "p/meta.json").read_text())
    del old["settings"]["holdout"]  # as written before the hold-out was a setting
    (tmp_path / "p/meta.json").write_text(json.dumps(old))
    loaded = training_captions(tmp_path / "p/gen.jsonl")
    assert loaded.holdout == "pairs" and len(loaded.captions) > 5
    (tmp_path / "p/meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        training_captions(tmp_path / "p/gen.jsonl")


def test_eval_set_is_reused_enlarged_with_its_own_holdout_and_never_overwritten(tmp_path):
    """A new eval set takes ShapesWorld's default hold-out; an existing one is reused as it is, and
    one too small is rewritten larger with the hold-out it was written with, so its first records stay
    (a set from before the caption hold-out keeps the pairs out)."""
    from orion_mllm.data.shapes.datasets import write_shapes_dataset
    from orion_mllm.eval.model_eval import EVAL_SEED, eval_set

    root = eval_set(tmp_path / "ev", size=32, n_und=4, n_edit=2, n_interleaved=1, progress=False)
    assert json.loads((root / "meta.json").read_text())["holdout"] == "captions"
    stamp = (root / "und.jsonl").stat().st_mtime_ns
    assert eval_set(root, size=32, n_und=3, n_edit=1, n_interleaved=1, progress=False) == root
    assert (root / "und.jsonl").stat().st_mtime_ns == stamp
    old = tmp_path / "old"
    write_shapes_dataset(old, size=32, n_und=4, n_gen=0, n_edit=10, n_interleaved=1, n_heldout=100,
                         seed=EVAL_SEED, holdout="pairs", add_layout="random", progress=False)  # fmt: skip
    before = (old / "und.jsonl").read_text().splitlines()
    edits_before = (old / "edit.jsonl").read_text().splitlines()
    eval_set(old, size=32, n_und=8, n_edit=10, n_interleaved=1, progress=False)
    after = (old / "und.jsonl").read_text().splitlines()
    assert len(after) == 8 and after[:4] == before
    assert (old / "edit.jsonl").read_text().splitlines() == edits_before  # "add" places kept
    assert json.loads((old / "meta.json").read_text())["holdout"] == "pairs"
    assert json.loads((old / "meta.json").read_text())["settings"]["add_layout"] == "random"
    with pytest.raises(ValueError, match="not the evaluation set"):
        eval_set(old, size=48, progress=False)
