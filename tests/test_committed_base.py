"""The committed stage-0 base (bases/PRESET): it loads, matches the tree's recipe, stays small, and the
quickstart starts from it, refuses one trained by another recipe, and retrains it with --from-scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orion_mllm.cli import main
from orion_mllm.model.backbone import load_backbone
from orion_mllm.workflow.committed_base import (
    MAX_BYTES,
    BaseMismatch,
    architecture_changes,
    build_base,
    check_base,
    committed_base,
    folder_bytes,
    recorded_phases,
)
from orion_mllm.workflow.quickstart import Quickstart, recipe_path
from orion_mllm.workflow.stage0 import stage0_recipe_files


def test_the_committed_tiny_base_loads_matches_its_recipe_and_is_small():
    folder = committed_base("tiny")
    assert folder is not None, "bases/tiny is missing: python scripts/build_base.py --preset tiny"
    # What `orion quickstart` (no smoke caps) would train in stage 0, data_root aside.
    provenance = check_base(folder, stage0_recipe_files(recipe_path("tiny", "stage0_base")), [])
    assert provenance["command"].startswith("python scripts/build_base.py")
    assert provenance["seed"] == 0 and provenance["wall_seconds"] > 0 and provenance["steps"] > 0
    assert folder_bytes(folder) <= MAX_BYTES
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    run = json.loads((folder / "run.json").read_text())
    # The copied run is the last phase's; the provenance counts every phase's steps.
    phases = recorded_phases(provenance)
    assert run["stage"] == "base" and run["status"] == "finished" and run["steps"] == phases[-1]["steps"]
    assert provenance["steps"] == sum(p["steps"] for p in phases)
    backbone, processor = load_backbone(folder / "final")
    ids = processor.tokenizer("What shape is the red object?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = backbone(input_ids=ids).logits
    assert torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory) -> Path:
    """A micro base built by the same code as bases/tiny, with the quickstart's smoke cap of 4 steps."""
    root = tmp_path_factory.mktemp("bases")
    work = tmp_path_factory.mktemp("build")
    recipe = recipe_path("micro", "stage0_base")
    build_base([recipe], root / "micro", work, ["train.max_steps=4"], command="test")
    return root


def test_quickstart_copies_a_matching_committed_base_instead_of_training(micro_base, tmp_path):
    qs = Quickstart("micro", tmp_path / "qs", max_steps=4, eval_limit=6, progress=False, bases=micro_base)
    assert qs.base == micro_base / "micro"
    qs.run_until(("stage0_base",))
    run = tmp_path / "qs" / "stage0_base"
    assert not (run / "checkpoints").exists()  # copied, not trained
    assert (run / "final" / "model.safetensors").read_bytes() == (
        micro_base / "micro" / "final" / "model.safetensors"
    ).read_bytes()
    state = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert "stage0_base" in state["steps"] and state["from_scratch"] is False
    # The decoder's `encoder: previous` finds the copied run as the finished stage-0 run.
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_a_base_trained_by_another_recipe_is_refused_and_from_scratch_trains(micro_base, tmp_path, capsys):
    qs = Quickstart("micro", tmp_path / "a", max_steps=5, eval_limit=6, progress=False, bases=micro_base)
    with pytest.raises(BaseMismatch, match=r"train\.max_steps.*--from-scratch"):
        qs.run_until(("stage0_base",))
    assert not (tmp_path / "a" / "stage0_base").exists()
    fresh = Quickstart(
        "micro", tmp_path / "b", max_steps=5, eval_limit=6, progress=False, bases=micro_base,
        from_scratch=True,
    )  # fmt: skip
    assert fresh.base is None
    fresh.run_until(("stage0_base",))
    assert json.loads((tmp_path / "b" / "stage0_base" / "run.json").read_text())["steps"] == 5
    # The setting is part of the run: resuming it the other way is refused with one line.
    capsys.readouterr()
    code = main(["quickstart", "--preset", "micro", "--out", str(tmp_path / "b"), "--max-steps", "5",
                 "--eval-limit", "6"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "from_scratch True -> False" in err and len(err.splitlines()) == 1


def test_recipe_keys_added_after_the_build_count_as_their_defaults(micro_base, tmp_path):
    """A base recorded before a recipe key existed still matches while the key keeps its default,
    and stops matching once the tree sets it to something else."""
    import shutil

    folder = tmp_path / "micro"
    shutil.copytree(micro_base / "micro", folder)
    provenance = json.loads((folder / "provenance.json").read_text())
    del provenance["phases"][0]["recipe"]["trainable"]["merger"]  # as written before trainable.merger existed
    (folder / "provenance.json").write_text(json.dumps(provenance))
    recipe = [recipe_path("micro", "stage0_base")]
    assert check_base(folder, recipe, ["train.max_steps=4"])["command"] == "test"
    with pytest.raises(BaseMismatch, match=r"trainable\.merger"):
        check_base(folder, recipe, ["train.max_steps=4", "trainable.merger=true"])


def test_generator_settings_of_files_stage0_never_reads_do_not_count(micro_base):
    """Stage 0 reads und.jsonl only: where "add" edits put the new object, or how many edits there are,
    leaves its data byte for byte (FILE_SETTINGS), so the base still matches; a setting und.jsonl
    depends on does not."""
    from orion_mllm.train.recipe import load_recipe
    from orion_mllm.workflow.committed_base import unread_data_settings

    folder, recipe = micro_base / "micro", [recipe_path("micro", "stage0_base")]
    base = ["train.max_steps=4"]
    ignored = unread_data_settings(load_recipe(recipe[0], base))
    assert "shapes_data.add_layout" in ignored and "shapes_data.n_edit" in ignored
    assert not {"shapes_data.n_und", "shapes_data.caption_order", "shapes_data.seed"} & set(ignored)
    assert check_base(folder, recipe, [*base, "shapes_data.add_layout=canonical", "shapes_data.n_edit=7"])
    with pytest.raises(BaseMismatch, match=r"shapes_data\.caption_order"):
        check_base(folder, recipe, [*base, "shapes_data.caption_order=split"])
    # A stage that reads edit.jsonl depends on it.
    stage3 = load_recipe(recipe_path("micro", "stage3_sft"), [])
    assert "shapes_data.add_layout" not in unread_data_settings(stage3)


def test_a_base_of_another_shape_than_its_preset_is_refused(micro_base, tmp_path):
    """A preset's architecture is code, not recipe: a base built before the preset changed (here one
    more key/value head) passes the recipe check yet must be refused by name."""
    import shutil

    folder = tmp_path / "micro"
    shutil.copytree(micro_base / "micro", folder)
    recipe = [recipe_path("micro", "stage0_base")]
    assert architecture_changes(folder / "final", "micro") == []
    config_path = folder / "final" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["num_key_value_heads"] += 1
    config_path.write_text(json.dumps(config))
    assert architecture_changes(folder / "final", "micro") == ["text.num_key_value_heads"]
    with pytest.raises(BaseMismatch, match=r"another architecture .* text\.num_key_value_heads"):
        check_base(folder, recipe, ["train.max_steps=4"])


def two_phase_recipes(folder: Path) -> tuple[list[Path], str]:
    """The micro stage 0 followed by a multiple-choice-only phase starting from it (and that phase's text)."""
    import shutil

    folder.mkdir()
    first = folder / "stage0_base.yaml"
    shutil.copy(recipe_path("micro", "stage0_base"), first)
    assert stage0_recipe_files(first) == [first]
    mcq = first.read_text().replace('init: "preset:micro"', 'init: "runs/shapes-micro/stage0_base/final"')
    mcq = mcq.replace("standardize_tokens_images: 512", "standardize_tokens_images: 0")
    mcq = mcq.replace("task: understanding, weight: 1.0}", "task: understanding, weight: 1.0, qtypes: [mcq]}")
    assert "qtypes: [mcq]" in mcq and "stage0_base/final" in mcq
    (folder / "stage0_mcq.yaml").write_text(mcq)
    files = stage0_recipe_files(first)
    assert [f.name for f in files] == ["stage0_base.yaml", "stage0_mcq.yaml"]
    return files, mcq


def test_stage0_phases_train_in_order_are_recorded_and_checked(tmp_path):
    """A stage 0 in two phases (the second on multiple-choice records only, from the first's model):
    the base is the last phase's run, provenance records both recipes, and the check refuses a base
    whose phases differ from the tree's."""
    from orion_mllm.workflow.stage0 import phase_run_dirs

    recipes = tmp_path / "recipes"
    files, mcq = two_phase_recipes(recipes)

    work = tmp_path / "work"
    provenance = build_base(files, tmp_path / "bases" / "micro", work, ["train.max_steps=3"], command="test")
    first_run, last_run = phase_run_dirs(files, work / "stage0_base")
    assert first_run == work / "stage0_base.phases" / "stage0_base" and last_run == work / "stage0_base"
    run = json.loads((last_run / "run.json").read_text())
    assert run["init"] == str((first_run / "final").resolve())  # the second phase starts from the first
    assert [Path(p["recipe_file"]).name for p in provenance["phases"]] == [
        "stage0_base.yaml",
        "stage0_mcq.yaml",
    ]
    assert provenance["steps"] == 6 and [p["steps"] for p in provenance["phases"]] == [3, 3]
    # Recorded without the model.init override: the phase's own file value, wherever it ran.
    assert provenance["phases"][1]["recipe"]["model"]["init"] == "runs/shapes-micro/stage0_base/final"
    assert provenance["phases"][1]["recipe"]["data"][0]["qtypes"] == ["mcq"]

    folder = tmp_path / "bases" / "micro"
    assert check_base(folder, files, ["train.max_steps=3"])["steps"] == 6
    with pytest.raises(
        BaseMismatch, match=r"phases \['stage0_base', 'stage0_mcq'\], the tree has \['stage0_base'\]"
    ):
        check_base(folder, files[:1], ["train.max_steps=3"])
    (recipes / "stage0_mcq.yaml").write_text(mcq.replace("max_lr: 0.002", "max_lr: 0.001"))
    with pytest.raises(BaseMismatch, match=r"stage0_mcq\.yaml \(differs at optim\.max_lr"):
        check_base(folder, files, ["train.max_steps=3"])


def test_a_base_is_extended_by_later_phases_without_retraining_the_first(micro_base, tmp_path):
    """--reuse-base: the committed one-phase base is the first phase's result; only the second trains,
    and the provenance carries the first phase's own record. A base of another recipe is refused."""
    from orion_mllm.workflow.stage0 import phase_run_dirs

    files, _ = two_phase_recipes(tmp_path / "recipes")
    old = micro_base / "micro"
    with pytest.raises(ValueError, match=r"another stage0_base\.yaml \(differs at train\.max_steps"):
        build_base(files, tmp_path / "x", tmp_path / "wx", ["train.max_steps=3"], reuse=old)
    work = tmp_path / "work"
    provenance = build_base(files, tmp_path / "new", work, ["train.max_steps=4"], command="extend", reuse=old)
    first_run, _ = phase_run_dirs(files, work / "stage0_base")
    assert not (first_run / "checkpoints").exists()  # copied, not trained
    assert (first_run / "final" / "model.safetensors").read_bytes() == (
        old / "final" / "model.safetensors"
    ).read_bytes()
    first, second = provenance["phases"]
    assert first["reused_from"]["command"] == "test" and "reused_from" not in second
    assert provenance["steps"] == 8 and provenance["command"] == "extend"
    assert provenance["wall_seconds"] > provenance["wall_seconds_this_build"] > 0
    assert check_base(tmp_path / "new", files, ["train.max_steps=4"])["command"] == "extend"
    with pytest.raises(ValueError, match="are not the first of"):
        build_base(files, tmp_path / "y", tmp_path / "wy", ["train.max_steps=4"], reuse=tmp_path / "new")
