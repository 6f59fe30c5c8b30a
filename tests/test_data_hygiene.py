"""Generated data never trains a run quietly: a ShapesWorld folder is reused only if its ``meta.json``
records the recipe's ``shapes_data`` settings, and the repository tracks no generated files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from orion_mllm.cli import main
from orion_mllm.data.shapes.datasets import SETTINGS, recorded_settings, write_shapes_dataset
from orion_mllm.train.recipe import load_recipe
from orion_mllm.train.setup import SetupError, ensure_shapes_data
from train_utils import RECIPES, REPO

# The micro recipe's shapes_data, shrunk so generating it takes a moment.
SMALL = ["shapes_data.n_und=6", "shapes_data.n_gen=6", "shapes_data.n_edit=5", "shapes_data.n_interleaved=1",
         "shapes_data.n_heldout=2"]  # fmt: skip


def _recipe(root: Path, *extra: str):
    return load_recipe(RECIPES / "stage0_base.yaml", [f"data_root={root}", *SMALL, *extra])


def test_generated_folder_records_its_settings_and_is_reused(tmp_path):
    root = tmp_path / "data"
    recipe = _recipe(root)
    assert ensure_shapes_data(recipe, progress=False) == root
    meta = json.loads((root / "meta.json").read_text())
    assert meta["settings"] == recipe.shapes_data.model_dump()
    assert set(meta["settings"]) == set(SETTINGS)
    stamp = (root / "und.jsonl").stat().st_mtime_ns
    assert ensure_shapes_data(_recipe(root), progress=False) == root  # same settings: reused as it is
    assert (root / "und.jsonl").stat().st_mtime_ns == stamp


def test_folder_written_with_other_settings_is_refused(tmp_path):
    root = tmp_path / "data"
    ensure_shapes_data(_recipe(root), progress=False)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(SetupError) as err:
        other = _recipe(root, "shapes_data.n_und=7", "shapes_data.gen_layout=random")
        ensure_shapes_data(other, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"data_root={root}" in msg
    assert "n_und 6 vs recipe 7" in msg and "gen_layout 'canonical' vs recipe 'random'" in msg
    assert "data_root=NEWDIR" in msg and "shapes_data=null" in msg
    assert sorted(p.name for p in root.iterdir()) == before  # nothing deleted or regenerated
    # shapes_data=null: the folder is used as it is, without a check
    assert ensure_shapes_data(_recipe(root, "shapes_data="), progress=False) is None


def test_a_folder_missing_a_file_the_recipe_reads_is_refused(tmp_path):
    """A folder an older generator wrote (before draw_ask.jsonl) is named, not trained on half-read."""
    root = tmp_path / "data"
    recipe = load_recipe(RECIPES / "stage3_sft.yaml", [f"data_root={root}", *SMALL])
    assert "draw_ask.jsonl" in [e.path for e in recipe.data]
    ensure_shapes_data(recipe, progress=False)
    (root / "draw_ask.jsonl").unlink()
    with pytest.raises(SetupError, match=r"has no draw_ask\.jsonl \(an older ShapesWorld generator"):
        ensure_shapes_data(recipe, progress=False)
    assert (root / "gen.jsonl").is_file()  # nothing deleted


def test_orion_train_refuses_mismatched_data_with_one_line_exit_2(tmp_path, capsys):
    root = tmp_path / "data"
    write_shapes_dataset(
        root, size=48, n_und=4, n_gen=4, n_edit=2, n_interleaved=0, n_heldout=0, progress=False
    )
    rc = main(["train", str(RECIPES / "stage0_base.yaml"), "--output", str(tmp_path / "run"),
               f"data_root={root}", "max_steps=1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("orion train: error: ") and "n_und 4 vs recipe 800" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_older_folders_without_recorded_settings(tmp_path):
    root = tmp_path / "data"
    # Folders from before the hold-out was a setting held the colour-shape pairs out.
    recipe = _recipe(root, "shapes_data.holdout=pairs", "shapes_data.add_layout=random")
    ensure_shapes_data(recipe, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    # Written after gen_layout existed but before settings were recorded: read from its fields.
    del meta["settings"]
    assert recorded_settings(meta) == recipe.shapes_data.model_dump()
    (root / "meta.json").write_text(json.dumps(meta))
    assert ensure_shapes_data(recipe, progress=False) == root
    # ... so today's default (captions held out) refuses them, naming the setting.
    with pytest.raises(SetupError, match=r"holdout 'pairs' vs recipe 'captions'"):
        ensure_shapes_data(_recipe(root), progress=False)
    # Older still (no gen_layout, like the folder this repository once tracked): refused.
    del meta["gen_layout"]
    assert recorded_settings(meta) is None
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SetupError, match=r"without recorded generator settings.*data_root=NEWDIR"):
        ensure_shapes_data(recipe, progress=False)


def test_folders_written_with_other_request_templates_are_refused(tmp_path):
    """The request wordings are the generator's, not the settings': a folder from before the caption
    style was added holds other requests and is refused, naming both template counts."""
    from orion_mllm.data.templates import ALL_TEMPLATES, CAPTION

    root = tmp_path / "data"
    recipe = _recipe(root)
    ensure_shapes_data(recipe, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["num_templates"] == len(ALL_TEMPLATES) and set(CAPTION) <= set(ALL_TEMPLATES)
    meta["num_templates"] = len(ALL_TEMPLATES) - len(CAPTION)
    (root / "meta.json").write_text(json.dumps(meta))
    want = rf"with 36 request templates, this version has {len(ALL_TEMPLATES)}"
    with pytest.raises(SetupError, match=want):
        ensure_shapes_data(recipe, progress=False)


def test_recipes_sharing_a_data_root_share_its_settings():
    """Otherwise the second stage of a chain would refuse the first stage's data."""
    seen: dict[str, tuple[Path, dict]] = {}
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        r = load_recipe(path)
        if r.data_root is None or r.shapes_data is None:
            continue
        first = seen.setdefault(r.data_root, (path, r.shapes_data.model_dump()))
        assert r.shapes_data.model_dump() == first[1], f"{path}, {first[0]}: one data_root, two shapes_data"
    assert seen


def test_repository_tracks_no_generated_images():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"git ls-files failed: {proc.stderr.strip()}")
    tracked = proc.stdout.splitlines()
    images = [f for f in tracked if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    images = [f for f in images if not f.startswith(("docs/", "tests/"))]
    assert not images, f"{len(images)} generated images tracked, e.g. {images[:3]}"
    assert not any(f.startswith("data/") for f in tracked)


def test_a_folder_with_another_caption_order_is_refused(tmp_path):
    root = tmp_path / "data"
    ensure_shapes_data(_recipe(root), progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["settings"]["caption_order"] == "scene"
    # Folders written before the setting existed listed objects in the scene's order.
    del meta["settings"]["caption_order"]
    assert recorded_settings(meta)["caption_order"] == "scene"
    (root / "meta.json").write_text(json.dumps(meta))
    assert ensure_shapes_data(_recipe(root), progress=False) == root
    with pytest.raises(SetupError, match=r"caption_order 'scene' vs recipe 'split'"):
        ensure_shapes_data(_recipe(root, "shapes_data.caption_order=split"), progress=False)


def test_a_folder_with_another_add_layout_is_refused(tmp_path):
    root = tmp_path / "data"
    ensure_shapes_data(_recipe(root, "shapes_data.add_layout=canonical"), progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["settings"]["add_layout"] == "canonical"
    random = "shapes_data.add_layout=random"
    with pytest.raises(SetupError, match=r"add_layout 'canonical' vs recipe 'random'"):
        ensure_shapes_data(_recipe(root, random), progress=False)
    # Folders written before the setting existed placed added objects at random.
    del meta["settings"]["add_layout"]
    assert recorded_settings(meta)["add_layout"] == "random"
    (root / "meta.json").write_text(json.dumps(meta))
    assert ensure_shapes_data(_recipe(root, random), progress=False) == root
