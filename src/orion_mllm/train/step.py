"""One optimizer step of ORION training: micro-batches through student and teacher, clip, AdamW.

``train_step`` is *the* step: the trainer calls it for every step (after reading and counting the
step's data) and ``benchmarks/train_step.py`` times it. Each micro-batch's terms go through the one
objective, ``orion_mllm.losses.step_loss``, with the micro-batch's share of the step's *global*
targets, so the result does not depend on how samples were split into micro-batches or over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from orion_mllm.losses import LossWeights, TargetShares, step_loss, step_metrics
from orion_mllm.model.orion import OrionModel
from orion_mllm.sequence import Batch
from orion_mllm.train.anomaly import AnomalyGuard
from orion_mllm.train.batches import text_targets, visual_targets
from orion_mllm.train.distributed import DistState, all_reduce_sum


def encode_step_images(
    model: OrionModel,
    micro_batches: Sequence[Batch],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> list[Batch]:
    """The micro-batches on ``device`` with their visual tokens attached, the tower run once for all.

    In every ORION stage the vision tower is frozen, so its tokens do not depend on which micro-batch an
    image sits in. One call over the step's images replaces one call per micro-batch: at the small
    presets the tower's fixed cost per call (rotary tables, window indices) outweighs its arithmetic,
    and this was ~30% of a tiny stage-2 step. A trainable tower (stage-0 base training) is left to the
    model's forward, which keeps its gradient.
    """
    moved = [b.to(device) for b in micro_batches]
    tower = model.backbone.model.visual
    if any(p.requires_grad for p in tower.parameters()):
        return moved
    todo = [i for i, b in enumerate(moved) if b.visual_tokens is None and b.pixel_values is not None]
    if not todo:
        return moved
    merge = model.config.image_spec.merge_size
    with torch.no_grad(), autocast():
        pixels = torch.cat([moved[i].pixel_values for i in todo])
        tokens = model.encode_images(pixels, torch.cat([moved[i].image_grid_thw for i in todo]))
    counts = [int(moved[i].image_grid_thw.prod(dim=1).sum()) // merge**2 for i in todo]
    if sum(counts) != tokens.shape[0]:
        raise ValueError(f"vision tower returned {tokens.shape[0]} tokens for images of {sum(counts)}")
    for i, part in zip(todo, tokens.split(counts), strict=True):
        moved[i] = replace(moved[i], visual_tokens=part)
    return moved


def train_step(
    model: OrionModel,
    teacher: nn.Module | None,
    micro_batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    trainable: Sequence[nn.Parameter],
    weights: LossWeights,
    *,
    dist: DistState,
    step_text: float,
    step_visual: float,
    n_micro: int | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    grad_clip: float = 1.0,
    guard: AnomalyGuard | None = None,
    step: int | None = None,
    visual_input_noise: float = 0.0,
    noise_schedule: str = "fixed",
    ce_weighting: str = "token",
) -> dict[str, Any]:
    """Forward + backward of this rank's micro-batches, then clip and (unless skipped) step.

    ``step_text`` / ``step_visual``: the step's text / visual targets over all micro-batches and
    ranks. ``n_micro``: the most micro-batches any rank has (default: this rank's); a rank with
    fewer runs dummy repeats of its first, which count 0 but keep FSDP's collectives in step.
    ``guard`` decides whether to skip the update (None: always step). ``ce_weighting`` ``square``: each
    micro-batch's CE is its response-weighted mean (``OrionModel.forward``), combined across
    micro-batches by their target counts like the plain mean.
    Returns ``loss``, ``ce``, ``mse``, ``kl`` (``step_metrics``), ``grad_norm`` and ``skipped``.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    n_micro = len(micro_batches) if n_micro is None else n_micro
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3, dtype=torch.float64)
    on_device = encode_step_images(model, micro_batches, dist.device, autocast)
    for i in range(n_micro):
        real = i < len(micro_batches)
        batch = on_device[i if real else 0]  # dummy repeats keep FSDP in step
        if dist.distributed:
            model.set_requires_gradient_sync(i == n_micro - 1)
        with autocast():
            out = model(
                batch, weights, teacher, visual_input_noise=visual_input_noise, noise_schedule=noise_schedule,
                ce_weighting=ce_weighting,
            )  # fmt: skip
        shares = TargetShares.of(
            text_targets(batch),
            visual_targets(batch),
            step_text,
            step_visual,
            world_size=dist.world_size,
            dummy=not real,
        )
        objective = step_loss(out.terms, weights, shares)
        for k, part in enumerate(objective.parts):
            sums[k] += part
        objective.loss.backward()
    metrics = step_metrics(all_reduce_sum(sums.tolist(), dist), weights)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable), grad_clip, foreach=True)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    skip = guard is not None and guard.check(metrics["loss"], grad_norm, step=step)
    if skip:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return {**metrics, "grad_norm": grad_norm, "skipped": skip}
