"""One owner for the objective: the trainer, the train-step benchmark and the demo weigh the model's
terms through ``losses.step_loss`` and log the same step loss for the same batch."""

from __future__ import annotations

import copy
import importlib.util
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import orion_mllm.demo as demo
import orion_mllm.train.step as train_step_module
from orion_mllm.demo import demo_conversations, make_batches, train_steps
from orion_mllm.losses import LossWeights, step_loss
from orion_mllm.model.orion import OrionModel
from orion_mllm.model.teacher import make_teacher
from orion_mllm.train.anomaly import AnomalyGuard
from orion_mllm.train.batches import StepData
from orion_mllm.train.recipe import RecipeError
from orion_mllm.train.trainer import Trainer, param_groups
from train_utils import micro_recipe

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module():
    """``benchmarks/train_step.py`` as a module (it imports its sibling ``proc_memory``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCHMARKS / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _optimizer(model: OrionModel) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-15)


def test_trainer_benchmark_and_demo_log_the_same_step_loss(tmp_path, monkeypatch):
    bench = _benchmark_module()
    weights = bench.STAGE2_WEIGHTS
    assert weights == LossWeights(1.0, 1.0, 0.01)
    base = OrionModel.from_preset("micro", seed=1)
    teacher = make_teacher(base)
    with torch.no_grad():  # move the student off its teacher so the KL term is not zero
        for p in base.backbone.model.language_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = make_batches(base, demo_conversations(2), batch_size=8)[0]
    assert batch.visual_positions.numel() and (batch.labels != -100).any()

    # Every path must reach the objective through step_loss: record each call's backpropagated scalar.
    calls: dict[str, list[float]] = {"step": [], "demo": []}

    def spy(where):
        def wrapped(*args, **kwargs):
            out = step_loss(*args, **kwargs)
            calls[where].append(float(out.loss.detach()))
            return out

        return wrapped

    monkeypatch.setattr(train_step_module, "step_loss", spy("step"))
    monkeypatch.setattr(demo, "step_loss", spy("demo"))

    # demo: one step of its plain loop over this one batch
    model = copy.deepcopy(base)
    log = train_steps(model, [batch], weights, steps=1, lr=1e-3, teacher=teacher, progress=False)[0]
    from_demo = {"loss": log.loss, "ce": log.ce, "mse": log.mse, "kl": log.kl}

    # benchmark: its timed step function
    model = copy.deepcopy(base).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    stats = bench.train_step(
        model, teacher, _optimizer(model), trainable, [batch], torch.device("cpu"), nullcontext
    )
    from_bench = {k: stats[k] for k in from_demo}

    # trainer: its own step method, on the same batch as the step's only micro-batch
    recipe = micro_recipe("stage2_pretrain.yaml", tmp_path, "train.visual_input_noise=0")
    assert recipe.loss == weights
    trainer = Trainer(recipe, tmp_path / "run", device="cpu", tensorboard=False)
    model = copy.deepcopy(base).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    data = StepData([batch], good=int(batch.input_ids.shape[0]))
    optimizer = _optimizer(model)
    record = trainer._train_step(0, data, model, teacher, optimizer, trainable, AnomalyGuard(), nullcontext)
    from_trainer = {k: record[k] for k in from_demo}

    assert calls["demo"] and calls["step"] == calls["demo"] * 2  # benchmark, then trainer
    assert from_trainer == from_bench == from_demo  # bit for bit
    assert from_demo["kl"] > 0 and from_demo["loss"] == pytest.approx(
        from_demo["ce"] + from_demo["mse"] + 0.01 * from_demo["kl"], rel=1e-12
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.mse=-1", r"loss: loss weight mse must be >= 0, got -1\.0$"),
        ("loss.kl=.nan", r"loss: loss weight kl must be finite, got nan$"),
        ("loss.cee=1", r"loss\.cee: unknown key$"),
    ],
)
def test_recipe_loss_section_is_the_validated_weights(override, message):
    recipe = micro_recipe("stage2_pretrain.yaml", "data")
    assert isinstance(recipe.loss, LossWeights) and recipe.loss.kl == 0.01
    with pytest.raises(RecipeError, match=message) as err:
        micro_recipe("stage2_pretrain.yaml", "data", override)
    assert "\n" not in str(err.value)


def test_train_step_runs_the_frozen_tower_once_for_all_micro_batches(monkeypatch):
    """``encode_step_images``: one tower call per step, the same step as with tokens attached beforehand."""
    from dataclasses import replace

    from orion_mllm.train.distributed import DistState
    from orion_mllm.train.step import encode_step_images, train_step

    base = OrionModel.from_preset("micro", seed=1)
    base.set_vision_tower_trainable(False)
    teacher = make_teacher(base)
    attached = make_batches(base, demo_conversations(4), batch_size=4)
    assert len(attached) >= 2 and all(b.visual_tokens is not None for b in attached)
    bare = [replace(b, visual_tokens=None) for b in attached]
    weights = LossWeights(1.0, 1.0, 0.01)
    dist = DistState(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def run(batches):
        model = copy.deepcopy(base).train()
        calls = []
        encode = model.encode_images
        monkeypatch.setattr(model, "encode_images", lambda *a: calls.append(1) or encode(*a))
        trainable = [p for p in model.parameters() if p.requires_grad]
        total_text = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
        total_visual = sum(int(b.visual_positions.shape[0]) for b in batches)
        out = train_step(
            model, teacher, batches, _optimizer(model), trainable, weights, dist=dist,
            step_text=total_text, step_visual=total_visual,
        )  # fmt: skip
        return out, len(calls)

    from_attached, calls_attached = run(attached)
    from_bare, calls_bare = run(bare)
    assert (calls_attached, calls_bare) == (0, 1)
    for key in ("loss", "ce", "mse", "kl", "grad_norm"):
        assert from_bare[key] == pytest.approx(from_attached[key], rel=1e-5), key

    # Each micro-batch gets exactly its own images' tokens.
    moved = encode_step_images(base, bare, torch.device("cpu"))
    for got, want in zip(moved, attached, strict=True):
        torch.testing.assert_close(got.visual_tokens, want.visual_tokens)

    # A trainable tower (stage-0 base training) stays in the model's forward, where its gradient is.
    base.set_vision_tower_trainable(True)
    assert all(b.visual_tokens is None for b in encode_step_images(base, bare, torch.device("cpu")))
