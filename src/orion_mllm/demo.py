"""The smallest honest end-to-end run: build a preset, train all three ORION losses, save, reload.

``orion demo`` draws a handful of coloured-shape pictures, writes them into conversations of every
kind ORION trains on (text-to-image, understanding, editing), builds the frozen KL teacher, and
runs a few optimizer steps of the full objective (CE : MSE : KL = 1 : 1 : 0.01, LLM + vision head
trainable, vision tower frozen). It then saves the model, loads it back, checks the logits and head
outputs are identical, and prints a JSON summary. Until the ShapesWorld and training-engine issues
land, this is the project's main job; it is also what the learning-check test runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from orion_mllm.data.records import encode_record
from orion_mllm.losses import LossWeights, step_loss, step_metrics
from orion_mllm.model.orion import OrionModel
from orion_mllm.model.teacher import KLTeacher, make_teacher
from orion_mllm.sequence import Batch, attach_visual_tokens, collate

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: str, shape: str, size: int = 64) -> Image.Image:
    """One centred shape on white: enough structure for the model to regress distinct visual tokens."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    a, b = size * 0.2, size * 0.8
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([a, a, b, b], fill=fill)
    elif shape == "square":
        draw.rectangle([a, a, b, b], fill=fill)
    else:
        draw.polygon([(size / 2, a), (b, b), (a, b)], fill=fill)
    return img


def demo_conversations(num_pairs: int | None = None) -> list[list[dict]]:
    """Generation, understanding and editing conversations over the drawn shapes."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES][:num_pairs]
    convs = []
    for i, (colour, shape) in enumerate(pairs):
        image = draw_shape(colour, shape)
        convs.append(
            [
                {"role": "user", "content": f"Draw a {colour} {shape}."},
                {"role": "assistant", "content": [{"type": "image", "image": image}]},
            ]
        )
        convs.append(
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}],
                },
                {"role": "assistant", "content": f"A {colour} {shape}."},
            ]
        )
        # pairs are colour-major: stepping by len(SHAPES) gives the same shape in the next colour.
        other_colour, other_shape = pairs[(i + len(SHAPES)) % len(pairs)]
        if other_shape == shape and other_colour != colour:
            convs.append(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": image},
                            {"type": "text", "text": f"Make it {other_colour}."},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": [{"type": "image", "image": draw_shape(other_colour, shape)}],
                    },
                ]
            )
    return convs


def make_batches(model: OrionModel, conversations: list, batch_size: int) -> list[Batch]:
    """Encode, attach the frozen tower's visual tokens once, and collate into fixed batches."""
    builder = model.sequence_builder()
    encoded = [
        attach_visual_tokens(encode_record(builder, conv, record_id=f"demo-{i}"), model.encode_images)
        for i, conv in enumerate(conversations)
    ]
    pad = model.processor.tokenizer.pad_token_id
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


@dataclass
class StepLog:
    step: int
    loss: float
    ce: float | None
    mse: float | None
    kl: float | None


def train_steps(
    model: OrionModel,
    batches: list[Batch],
    weights: LossWeights,
    *,
    steps: int,
    lr: float,
    teacher: KLTeacher | None = None,
    clip: float = 1.0,
    progress: bool = True,
) -> list[StepLog]:
    """Plain AdamW loop over the batches (Table 1's betas/eps/decay/clip), one batch per step.

    The real trainer is separate (``orion_mllm.train``); both weigh the terms with the one
    objective, ``losses.step_loss``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.1)
    logs = []
    model.train()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for step in bar:
        out = model(batches[step % len(batches)], weights, teacher=teacher)
        objective = step_loss(out.terms, weights)  # one batch is the whole step: shares 1
        opt.zero_grad(set_to_none=True)
        objective.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        logged = step_metrics(objective.parts, weights)
        logs.append(StepLog(step, logged["loss"], logged["ce"], logged["mse"], logged["kl"]))
        bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if v is not None})
    return logs


@torch.no_grad()
def evaluate(
    model: OrionModel, batches: list[Batch], weights: LossWeights, teacher: KLTeacher | None = None
) -> dict[str, float]:
    """Mean of each loss term over the batches (eval mode)."""
    model.eval()
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in model(batch, weights, teacher=teacher).terms.as_floats().items():
            if v is not None:
                totals[k] = totals.get(k, 0.0) + v / len(batches)
    return totals


def run_demo(preset: str = "micro", out: str | Path = "runs/demo", steps: int = 200, seed: int = 0) -> dict:
    """Build, train, save, reload and verify; returns (and prints) a summary."""
    start = time.time()
    torch.manual_seed(seed)
    model = OrionModel.from_preset(preset, seed=seed)
    weights = LossWeights(ce=1.0, mse=1.0, kl=0.01)
    teacher = make_teacher(model)
    batches = make_batches(model, demo_conversations(), batch_size=4)
    before = evaluate(model, batches, weights, teacher)
    train_steps(model, batches, weights, steps=steps, lr=1e-3, teacher=teacher)
    after = evaluate(model, batches, weights, teacher)

    path = model.save_pretrained(out)
    reloaded = OrionModel.from_pretrained(path)
    # Visual tokens dropped: each model re-encodes the pixels, so the reloaded tower is checked too.
    probe = dataclasses.replace(batches[0], visual_tokens=None)
    same_logits = torch.equal(model.logits(probe), reloaded.logits(probe))
    hidden = torch.randn(3, model.hidden_size)
    same_head = torch.equal(model.predict_visual_tokens(hidden), reloaded.predict_visual_tokens(hidden))
    summary = {
        "preset": preset,
        "model_dir": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "conversations": sum(int(b.input_ids.shape[0]) for b in batches),
        "steps": steps,
        "loss_before": before,
        "loss_after": after,
        "mse_reduction": before["mse"] / max(after["mse"], 1e-30),
        "reload_identical": bool(same_logits and same_head),
        "wall_seconds": round(time.time() - start, 1),
    }
    if not summary["reload_identical"] or not all(math.isfinite(v) for v in after.values()):
        raise RuntimeError(f"demo failed its own checks: {json.dumps(summary)}")
    return summary
