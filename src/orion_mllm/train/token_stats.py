"""The regression targets' scale, so the MSE term means the same at every scale (``train.mse_normalize``).

The paper weights CE : MSE as 1 : 1 for Qwen2.5-VL's own visual tokens. The MSE of a regression is
measured in the targets' units, so the same weight pulls very differently on the shared LLM when the
tokens are larger or smaller (ShapesWorld's standardised tokens have std 0.1: an MSE of ~0.004 beside
a CE of ~1 barely moves the LLM; SMALL_SCALE.md measures it). With ``mse_normalize`` the MSE term is
divided by the targets' mean per-dimension variance, measured here on the stage's own first batches:
the term is then the share of the tokens' variance left unexplained (1.0 = predicting the per-dimension
mean), whatever the encoder's scale. The measurement is a pure function of the data and the frozen
tower, so a resumed run and every rank get the same number.
"""

from __future__ import annotations

import torch

from orion_mllm.model.orion import OrionModel
from orion_mllm.train.batches import StepLoader
from orion_mllm.train.distributed import DistState, all_reduce_sum


@torch.no_grad()
def target_token_variance(
    model: OrionModel, loader: StepLoader, dist: DistState, *, min_images: int = 256, max_steps: int = 16
) -> tuple[float, int]:
    """(mean per-dimension variance, number of generated images) of the generation targets in the
    first steps' data, read until ``min_images`` images (over all ranks) or ``max_steps`` steps."""
    d = model.hidden_size
    device = next(model.parameters()).device  # the model's own (it may not sit on dist.device yet)
    total = torch.zeros(2 * d + 1, dtype=torch.float64)
    for step in range(max_steps):
        for batch in loader.load(step).micro_batches:
            if not batch.visual_target_index.numel():
                continue
            tokens = model.batch_visual_tokens(batch.to(device)).double().cpu()
            rows = batch.visual_target_index.unique().cpu()
            t = tokens[rows]
            total[:d] += t.sum(0)
            total[d : 2 * d] += (t * t).sum(0)
            total[-1] += len(rows)
        summed = torch.tensor(all_reduce_sum(total.tolist(), dist), dtype=torch.float64)
        n_tokens = float(summed[-1])
        images = int(n_tokens // max(model.config.image_spec.gen_num_tokens, 1))
        if images >= min_images or step == max_steps - 1:
            break
    if n_tokens < 2:
        raise ValueError("train.mse_normalize: the first steps hold no generation targets to measure")
    mean = summed[:d] / n_tokens
    var = (summed[d : 2 * d] / n_tokens - mean * mean).clamp_min(0).mean().item()
    if not var > 0:
        raise ValueError("train.mse_normalize: the generation targets have zero variance")
    return var, images
