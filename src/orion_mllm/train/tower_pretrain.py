"""Vision-tower pre-training for the small presets' stage 0: a dense ShapesWorld objective.

Real ORION starts from Qwen2.5-VL, whose vision tower was pre-trained on billions of images; its
tokens already say what is where. The small presets start from a random tower, whose tokens hold the
picture but not in a form a small LLM can read: a linear probe on the token under an object finds its
shape 32% of the time (chance 17%), an MLP probe 73% (benchmarks/SMALL_SCALE.md), and the stage-0 base
never learned shapes. This module is the stand-in for the tower's own pre-training: every visual token
(the merger's output, one per 2x2 patches) is trained, through linear read-outs, to name the colour
and the shape of the object covering its cell (or background) and to reconstruct its cell's pixels.
The classification makes the scene linearly readable; the reconstruction keeps the tokens invertible,
because the same tokens are the generation targets the diffusion decoder renders. Optionally
(``position_weight``) each token also regresses its own place in the picture (row and column centre,
scaled to [-1, 1]): the tower has no absolute position embedding (2-D RoPE only), and without this the
token under an object tells its row no better than guessing the commonest row (benchmarks/token_probe.py
--position), while the LLM's attention values carry no position either. With it the probe reads row
and column ~0.8, but the tiny LLM still did not learn position questions (benchmarks/SMALL_SCALE.md,
session 5), so the shipped recipe leaves it off.

Pictures are rendered from the records' scenes at random sizes within the understanding resolution
range (the sizes stage 0 feeds), so the read-out holds for objects of every size and place. The
read-outs are thrown away afterwards; only the tower and merger keep what they learned.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orion_mllm.data.shapes.render import render_object_map, render_scene
from orion_mllm.data.shapes.world import COLOURS, SHAPES, Scene
from orion_mllm.model.orion import OrionModel

COLOUR_CLASSES: tuple[str, ...] = ("background", *COLOURS)
SHAPE_CLASSES: tuple[str, ...] = ("background", *SHAPES)


@dataclass(frozen=True)
class TowerPretrainSettings:
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    recon_weight: float = 1.0
    position_weight: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class TowerPretrainResult:
    steps: int
    seconds: float
    colour_accuracy: float  # over the last 10% of steps, object cells only
    shape_accuracy: float
    recon_mse: float
    class_loss: float  # colour + shape cross-entropy over every cell, last 10% of steps
    position_accuracy: float | None = None  # tokens whose read-out place rounds to their own cell


def cell_labels(scene: Scene, side: int, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and shape class of every ``cell`` x ``cell`` cell of a ``side`` px picture, raster order.

    A cell is labelled with the object covering most of its pixels when that object covers at least a
    quarter of the cell or a quarter of the object's own pixels (so a small object split across cells
    still labels the cell holding most of it); otherwise background (class 0).
    """
    if side % cell:
        raise ValueError(f"picture side {side} is not a multiple of the token cell {cell}")
    grid = side // cell
    owner = torch.frombuffer(bytearray(render_object_map(scene, side).tobytes()), dtype=torch.uint8)
    owner = owner.view(grid, cell, grid, cell).permute(0, 2, 1, 3).reshape(grid * grid, cell * cell).long()
    colour = torch.zeros(grid * grid, dtype=torch.long)
    shape = torch.zeros(grid * grid, dtype=torch.long)
    if not scene.objects:
        return colour, shape
    counts = F.one_hot(owner, len(scene.objects) + 1).sum(1)[:, 1:]  # [cells, objects]
    area = counts.sum(0).clamp_min(1)
    best_count, best = counts.max(1)
    keep = (best_count > 0) & ((best_count >= cell * cell / 4) | (best_count >= area[best] / 4))
    for i, obj in enumerate(scene.objects):
        mine = keep & (best == i)
        colour[mine] = COLOUR_CLASSES.index(obj.colour)
        shape[mine] = SHAPE_CLASSES.index(obj.shape)
    return colour, shape


def cell_places(grid: int) -> torch.Tensor:
    """(row, column) centres of a ``grid`` x ``grid`` token grid, raster order, in [-1, 1]: [grid*grid, 2]."""
    centre = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    return torch.stack(torch.meshgrid(centre, centre, indexing="ij"), -1).reshape(-1, 2)


def picture_sides(min_side: int, max_side: int, factor: int) -> list[int]:
    """Every square side in [min_side, max_side] that is a multiple of patch x merge."""
    sides = list(range(math.ceil(min_side / factor) * factor, max_side + 1, factor))
    if not sides:
        raise ValueError(f"no picture side in [{min_side}, {max_side}] is a multiple of {factor}")
    return sides


def pretrain_tower(
    model: OrionModel,
    scenes: Sequence[Scene],
    settings: TowerPretrainSettings,
    *,
    log: Callable[[str], None] | None = None,
) -> TowerPretrainResult:
    """Train the tower + merger of ``model`` (in place) on the dense objective; returns its last accuracy."""
    if not scenes:
        raise ValueError("tower pre-training needs ShapesWorld records with a 'scene'")
    if settings.steps < 1:
        raise ValueError(f"tower pre-training needs steps >= 1, got {settings.steps}")
    spec = model.config.image_spec
    factor = spec.factor
    sides = picture_sides(spec.und_min_long_side, spec.und_max_long_side, factor)
    processor = model.processor.image_processor
    visual = model.backbone.model.visual
    width = model.hidden_size
    torch.manual_seed(settings.seed)
    colour_head = torch.nn.Linear(width, len(COLOUR_CLASSES))
    shape_head = torch.nn.Linear(width, len(SHAPE_CLASSES))
    place_head = torch.nn.Linear(width, 2) if settings.position_weight > 0 else None
    was_training = visual.training
    visual.train()
    visual.requires_grad_(True)
    rng = random.Random(settings.seed)
    recon_head: torch.nn.Linear | None = None
    optimizer = None
    history: list[tuple[float, float, float, float]] = []
    t0 = time.perf_counter()
    for step in range(settings.steps):
        side = rng.choice(sides)
        batch = [scenes[rng.randrange(len(scenes))] for _ in range(settings.batch_size)]
        out = processor(images=[render_scene(s, side) for s in batch], return_tensors="pt")
        if out["image_grid_thw"][0, 1:].tolist() != [side // spec.patch_size] * 2:
            raise ValueError(  # the cell labels are drawn for the side asked, not a resized picture
                f"the image processor resized {side} px pictures to a {out['image_grid_thw'][0].tolist()} "
                "patch grid; check its min/max pixels against resolution.und_*_long_side"
            )
        pixels = out["pixel_values"].to(next(visual.parameters()).dtype)
        tokens = visual(pixels, grid_thw=out["image_grid_thw"]).pooler_output.float()
        labels = [cell_labels(s, side, factor) for s in batch]
        colour = torch.cat([c for c, _ in labels])
        shape = torch.cat([s for _, s in labels])
        target = out["pixel_values"].float().view(tokens.shape[0], -1)  # each token's merge x merge patches
        if recon_head is None:  # its width (merge^2 patches x channels) is known once a batch is made
            recon_head = torch.nn.Linear(width, target.shape[1])
            params = [*visual.parameters(), *colour_head.parameters(), *shape_head.parameters(),
                      *recon_head.parameters(), *(place_head.parameters() if place_head else ())]  # fmt: skip
            optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.95))
        lr = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, settings.steps // 20))
        colour_logits, shape_logits = colour_head(tokens), shape_head(tokens)
        recon = F.mse_loss(recon_head(tokens), target)
        classify = F.cross_entropy(colour_logits, colour) + F.cross_entropy(shape_logits, shape)
        loss = classify + settings.recon_weight * recon
        place_acc = float("nan")
        if place_head is not None:
            grid = side // factor
            places = cell_places(grid).repeat(len(batch), 1)
            predicted = place_head(tokens)
            loss = loss + settings.position_weight * F.mse_loss(predicted, places)
            with torch.no_grad():  # the predicted cell: nearest centre along each axis
                cell = ((predicted + 1) / 2 * grid).floor().clamp(0, grid - 1)
                place_acc = (cell == ((places + 1) / 2 * grid).floor()).all(1).float().mean().item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        with torch.no_grad():
            objects = colour > 0  # accuracy on object cells: background is most cells and easy
            c_acc = _accuracy(colour_logits[objects], colour[objects])
            s_acc = _accuracy(shape_logits[objects], shape[objects])
        history.append((c_acc, s_acc, recon.item(), classify.item(), place_acc))
        if log is not None and (step + 1) % max(1, settings.steps // 10) == 0:
            c, s, r, _, p = _mean_tail(history, settings.steps)
            place = f" place {p:.3f}" if place_head is not None else ""
            log(
                f"tower pre-training {step + 1}/{settings.steps}: colour {c:.3f} shape {s:.3f}{place} "
                f"recon {r:.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    visual.train(was_training)
    c, s, r, ce, p = _mean_tail(history, settings.steps)
    return TowerPretrainResult(
        steps=settings.steps,
        seconds=time.perf_counter() - t0,
        colour_accuracy=c,
        shape_accuracy=s,
        recon_mse=r,
        class_loss=ce,
        position_accuracy=p if place_head is not None else None,
    )


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() if len(labels) else 0.0


def _mean_tail(history: list[tuple[float, ...]], steps: int) -> tuple[float, ...]:
    """Per-column mean over the last 10% of the run's steps (smooths the per-batch noise)."""
    tail = history[-max(1, steps // 10) :]
    return tuple(sum(column) / len(tail) for column in zip(*tail, strict=True))
