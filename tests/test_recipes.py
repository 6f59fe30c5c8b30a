"""Recipes: every shipped file validates, Table 1's numbers, strict errors naming keys, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_mllm.train.recipe import RecipeError, load_recipe, parse_recipe, recipe_to_yaml

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))

# Table 1 of the paper: (max lr, min lr, scheduler, CE, MSE, KL, epochs, global batch, und range)
TABLE_1 = {
    "stage1_warmup": (1e-3, 1e-3, "constant", 0.0, 1.0, 0.0, 2, 2048, None),
    "stage2_pretrain": (1e-4, 0.0, "cosine", 1.0, 1.0, 0.01, 2, 4096, (56, 1024)),
    "stage3_sft": (1e-4, 1e-5, "cosine", 1.0, 1.0, 0.01, 1, 4096, (56, 1024)),
}


def test_recipes_are_shipped():
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    for size in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        assert {f"{size}/{stage}" for stage in TABLE_1} <= names
    for size in ("micro", "tiny"):
        assert {f"{size}/{stage}" for stage in ("stage0_base", *TABLE_1)} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert parse_recipe(__import__("yaml").safe_load(recipe_to_yaml(recipe))) == recipe  # round trip


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name.startswith("qwen2.5-vl")], ids=str)
def test_real_scale_recipes_hold_table_1(path):
    r = load_recipe(path)
    max_lr, min_lr, sched, ce, mse, kl, epochs, batch, und = TABLE_1[path.stem]
    assert (r.optim.max_lr, r.optim.min_lr, r.optim.scheduler) == (max_lr, min_lr, sched)
    assert (r.loss.ce, r.loss.mse, r.loss.kl) == (ce, mse, kl)
    assert (r.optim.weight_decay, r.optim.grad_clip, r.optim.warmup_ratio) == (0.1, 1.0, 0.05)
    assert (r.optim.betas, r.optim.eps) == ((0.9, 0.95), 1e-15)
    assert (r.train.epochs, r.train.global_batch_size) == (epochs, batch)
    assert (r.resolution.gen_min_long_side, r.resolution.gen_max_long_side) == (252, 252)
    got_und = (r.resolution.und_min_long_side, r.resolution.und_max_long_side)
    assert got_und == (und if und else (None, None))
    assert not r.trainable.vision_tower
    assert r.trainable.llm == (path.stem != "stage1_warmup") and r.trainable.head
    tasks = {d.task for d in r.data}
    assert ("editing" in tasks) == (path.stem == "stage3_sft")


def test_overrides_and_strict_errors(tmp_path):
    path = RECIPES[0]
    r = load_recipe(path, ["optim.max_lr=2e-3", "optim.min_lr=2e-3", "train.max_steps=10", "data_root=/data"])
    assert (r.optim.max_lr, r.train.max_steps, r.data_root) == (2e-3, 10, "/data")
    with pytest.raises(RecipeError, match=r"optim\.lr_max: unknown key"):
        load_recipe(path, ["optim.lr_max=1"])
    with pytest.raises(RecipeError, match=r"train\.global_batch_size: Input should be a valid integer"):
        load_recipe(path, ["train.global_batch_size=lots"])
    with pytest.raises(RecipeError, match="a constant schedule needs min_lr == max_lr"):
        load_recipe(path, ["optim.scheduler=constant", "optim.min_lr=0"])
    with pytest.raises(RecipeError, match=r"expected key\.sub=value"):
        load_recipe(path, ["optim.max_lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_stage_rules():
    warmup = next(p for p in RECIPES if p.stem == "stage1_warmup")
    with pytest.raises(RecipeError, match="warmup trains the head only"):
        load_recipe(warmup, ["trainable.llm=true"])
    with pytest.raises(RecipeError, match="vision tower and merger stay frozen"):
        load_recipe(warmup, ["trainable.vision_tower=true"])
    with pytest.raises(RecipeError, match="vision tower and merger stay frozen"):
        load_recipe(warmup, ["trainable.merger=true"])
    sft = next(p for p in RECIPES if p.stem == "stage3_sft")
    with pytest.raises(RecipeError, match="trains LLM \\+ head"):
        load_recipe(sft, ["trainable.llm=false"])
    with pytest.raises(RecipeError, match=r"multiple of train\.micro_batch_size"):
        load_recipe(sft, ["train.micro_batch_size=3"])


def test_stage_base_can_train_the_merger_alone():
    """trainable.merger: the projector (patch features -> LLM token) learns, the tower's blocks do not."""
    from orion_mllm.train.setup import apply_trainable, build_model

    micro = Path(__file__).parent.parent / "recipes/shapes/micro/stage0_base.yaml"
    recipe = load_recipe(micro, ["trainable.merger=true"])
    model = build_model(recipe, recipe.model.init)
    apply_trainable(model, recipe)
    visual = model.backbone.model.visual
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert not any(p.requires_grad for p in visual.blocks.parameters())
    assert not any(p.requires_grad for p in visual.patch_embed.parameters())
    assert all(p.requires_grad for p in model.backbone.model.language_model.parameters())
