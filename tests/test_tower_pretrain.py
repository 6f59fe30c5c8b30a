"""Tower pre-training (stage 0 of the small presets): dense targets, the object map, the training loop."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from orion_mllm.data.shapes.render import render_object_map, render_scene
from orion_mllm.data.shapes.world import SHAPES, Scene, ShapeObject, sample_scene
from orion_mllm.images import ImageSpec
from orion_mllm.model.orion import OrionModel
from orion_mllm.train.recipe import RecipeError, load_recipe
from orion_mllm.train.tower_pretrain import (
    COLOUR_CLASSES,
    SHAPE_CLASSES,
    TowerPretrainSettings,
    cell_labels,
    cell_places,
    picture_sides,
    pretrain_tower,
)
from train_utils import RECIPES


def test_object_map_covers_exactly_the_drawn_pixels():
    """Same geometry as the picture: without anti-aliasing, non-white pixels == owned pixels."""
    rng = random.Random(0)
    for _ in range(5):
        scene = sample_scene(rng, n_objects=3)
        picture = torch.tensor(np.asarray(render_scene(scene, 64, supersample=1))).view(-1, 3)
        owner = torch.tensor(np.asarray(render_object_map(scene, 64))).view(-1)
        assert torch.equal((picture != 255).any(1), owner > 0)
        assert set(owner.unique().tolist()) <= {0, 1, 2, 3}


def test_cell_labels_name_the_object_under_each_token():
    scene = Scene(
        (
            ShapeObject("square", "red", "large", 0.25, 0.25),  # covers the top-left 2x2 cells at 64 px
            ShapeObject("star", "blue", "small", 0.8, 0.8),
        )
    )
    colour, shape = cell_labels(scene, 64, 16)
    grid_c, grid_s = colour.view(4, 4), shape.view(4, 4)
    red, blue = COLOUR_CLASSES.index("red"), COLOUR_CLASSES.index("blue")
    assert (grid_c[:2, :2] == red).all() and (grid_s[:2, :2] == SHAPE_CLASSES.index("square")).all()
    assert grid_c[3, 3] == blue and grid_s[3, 3] == SHAPE_CLASSES.index("star")
    assert grid_c[0, 3] == 0 and grid_c[3, 0] == 0  # empty corners are background
    # A small object at a small size still labels the cell that holds most of it.
    tiny = Scene((ShapeObject("circle", "green", "small", 0.3, 0.7),))
    colour, shape = cell_labels(tiny, 32, 16)
    assert (colour == COLOUR_CLASSES.index("green")).sum() >= 1
    assert set(shape.tolist()) <= {0, SHAPE_CLASSES.index("circle")}
    with pytest.raises(ValueError, match="not a multiple of the token cell 16"):
        cell_labels(tiny, 40, 16)


def test_picture_sides():
    assert picture_sides(32, 128, 16) == [32, 48, 64, 80, 96, 112, 128]
    assert picture_sides(20, 40, 16) == [32]
    with pytest.raises(ValueError, match="multiple of 16"):
        picture_sides(33, 40, 16)


def test_pretraining_teaches_the_tower_and_only_the_tower():
    """A few steps on the micro preset: the read-out loss falls, the tower and merger change, the LLM not."""
    model = OrionModel.from_preset("micro", seed=0, dtype=torch.float32)
    model.config.image_spec = ImageSpec(
        patch_size=model.config.image_spec.patch_size,
        merge_size=model.config.image_spec.merge_size,
        gen_image_size=model.config.image_spec.gen_image_size,
        und_min_long_side=32,
        und_max_long_side=48,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(1)
    scenes = [sample_scene(rng, n_objects=rng.randint(1, 3)) for _ in range(64)]
    first = pretrain_tower(model, scenes, TowerPretrainSettings(steps=1, batch_size=16, lr=3e-3))
    model.load_state_dict(before)
    last = pretrain_tower(model, scenes, TowerPretrainSettings(steps=60, batch_size=16, lr=3e-3))
    assert last.recon_mse < 0.8 * first.recon_mse
    assert last.class_loss < 0.8 * first.class_loss
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.model.visual.merger") for k in changed)
    assert any(".visual.blocks." in k for k in changed)
    assert not any("language_model" in k or "lm_head" in k or "vision_head" in k for k in changed)
    with pytest.raises(ValueError, match="needs ShapesWorld records"):
        pretrain_tower(model, [], TowerPretrainSettings(steps=1))
    assert len(SHAPE_CLASSES) == len(SHAPES) + 1


def test_cell_places_are_raster_order_centres():
    assert cell_places(2).tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    places = cell_places(4)
    assert places.shape == (16, 2) and places[5].tolist() == [-0.25, -0.25]  # row 1, column 1


def test_place_readout_teaches_tokens_where_they_are():
    """position_weight > 0: each token regresses its own cell; the read-out's cell accuracy rises with
    steps (a random tower has no absolute position embedding, only 2-D RoPE), and it is off by default."""
    spec = ImageSpec(
        patch_size=8, merge_size=2, gen_image_size=32, und_min_long_side=32, und_max_long_side=48
    )
    rng = random.Random(1)
    scenes = [sample_scene(rng, n_objects=rng.randint(1, 3)) for _ in range(64)]
    results = []
    for steps in (1, 80):
        model = OrionModel.from_preset("micro", seed=0, dtype=torch.float32)
        model.config.image_spec = spec
        settings = TowerPretrainSettings(steps=steps, batch_size=16, lr=3e-3, position_weight=5.0)
        results.append(pretrain_tower(model, scenes, settings))
    first, last = results
    assert last.position_accuracy > first.position_accuracy + 0.2
    off = pretrain_tower(model, scenes, TowerPretrainSettings(steps=1, batch_size=4))
    assert off.position_accuracy is None


def test_tower_pretrain_is_a_stage_base_option_only():
    warmup = RECIPES / "stage1_warmup.yaml"
    with pytest.raises(RecipeError, match="tower_pretrain trains a random tower: stage base from a preset"):
        load_recipe(warmup, ["model.tower_pretrain={steps: 5}"])
    base = load_recipe(RECIPES / "stage0_base.yaml", ["model.tower_pretrain={steps: 5}"])
    assert base.model.tower_pretrain.steps == 5 and base.model.tower_pretrain.recon_weight == 1.0
    assert base.model.tower_pretrain.position_weight == 0.0
    with pytest.raises(RecipeError, match="position_weight"):
        load_recipe(RECIPES / "stage0_base.yaml", ["model.tower_pretrain={steps: 5, position_weight: -1}"])
    with pytest.raises(RecipeError, match="steps"):
        load_recipe(RECIPES / "stage0_base.yaml", ["model.tower_pretrain={steps: 0}"])


def test_stage_base_pretrains_the_tower_once(tmp_path, capsys):
    """The trainer runs the tower pre-training before stage 0 (the tower then differs from the random
    init and stays frozen for the LLM steps); a resumed run loads it from the checkpoint instead."""
    from orion_mllm.data.shapes.datasets import write_shapes_dataset
    from orion_mllm.train.setup import build_model
    from orion_mllm.train.trainer import Trainer
    from train_utils import micro_recipe

    data = tmp_path / "data"
    counts = {"n_und": 24, "n_gen": 0, "n_edit": 0, "n_interleaved": 0, "n_heldout": 0}
    write_shapes_dataset(data, size=48, progress=False, **counts)
    overrides = ["model.tower_pretrain={steps: 3, batch_size: 4}", "train.epochs=1", "checkpoint.every=1"]
    recipe = micro_recipe("stage0_base.yaml", data, *overrides, "train.max_steps=3")
    Trainer(recipe, tmp_path / "run", tensorboard=False).run()
    assert "tower pre-trained: 3 steps" in capsys.readouterr().out
    random_tower = build_model(recipe, recipe.model.init).backbone.model.visual.state_dict()
    trained = load_file(tmp_path / "run/final/model.safetensors")  # stage 0 exports a plain Qwen2.5-VL
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(random_tower[key], trained[f"visual.{key}"])
    # As if killed after step 2: the last checkpoint and the finished state gone.
    run_info = tmp_path / "run/run.json"
    run_info.write_text(json.dumps({**json.loads(run_info.read_text()), "status": "running"}))
    shutil.rmtree(tmp_path / "run/checkpoints/step_00000003")
    Trainer(recipe, tmp_path / "run", tensorboard=False).run()
    out = capsys.readouterr().out
    assert "resumed from" in out and "tower pre-trained" not in out
