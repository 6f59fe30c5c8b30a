"""Rectified-flow training objective and sampler for ``OrionDecoder`` (kept apart from the network).

Convention (FLUX / SD3, and diffusers' ``FlowMatchEulerDiscreteScheduler``): at flow time
``t`` in [0, 1] the sample is ``x_t = (1 - t) * x_0 + t * noise`` and the network predicts the
velocity ``v = noise - x_0`` (so ``dx/dt = v``; sampling integrates from t = 1 to t = 0).

Training times are drawn as FLUX does: ``t = sigmoid(N(0, 1))`` (logit-normal), then shifted by
``shift`` (``t' = s t / (1 + (s - 1) t)``, more weight on noisy times for larger images). The
conditioning is replaced by the learned null sequence with probability ``cond_dropout``, which
teaches the unconditional velocity used by classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from orion_mllm.decoder.model import OrionDecoder


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_times(batch: int, *, shift: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """FLUX's logit-normal training times, shifted."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift_times(t, shift)


def flow_matching_loss(
    decoder: OrionDecoder,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    *,
    edit_tokens: torch.Tensor | None = None,
    cond_dropout: float = 0.1,
    shift: float = 1.0,
    loss_space: str = "velocity",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error for a batch of clean latents [B, C, h, w] and their tokens.

    ``loss_space="velocity"`` (FLUX): the error of the predicted velocity. ``"sample"``: the error of
    the implied clean sample ``x_0 = x_t - t v``, i.e. the velocity error weighted by ``t^2``; every
    noise level then counts alike instead of the nearly-clean ones dominating, which is what a
    clean-sample-predicting decoder needs to learn the image's layout from its tokens."""
    if loss_space not in ("velocity", "sample"):
        raise ValueError(f"loss_space={loss_space!r}: expected 'velocity' or 'sample'")
    b = latents.shape[0]
    device = latents.device
    x0 = decoder.pack(latents)
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
    t = sample_times(b, shift=shift, generator=generator).to(device=device, dtype=x0.dtype)
    xt = (1 - t.view(b, 1, 1)) * x0 + t.view(b, 1, 1) * noise
    cond, ids = decoder.condition(tokens, edit_tokens)
    spatial = decoder.spatial_condition(tokens, b)
    if cond_dropout > 0:
        drop = (torch.rand(b, generator=generator) < cond_dropout).to(device)
        if bool(drop.any()):
            null, _ = decoder.condition(None, batch=b)
            # Only the target stream is dropped; an edit stream stays (Nexus-Gen drops the instruction).
            n = null.shape[1]
            cond = cond.clone()
            cond[drop, :n] = null[drop].to(cond.dtype)
            if spatial is not None:
                null_spatial = decoder.spatial_condition(tokens, b, null=True)
                spatial = torch.where(drop.view(b, 1, 1), null_spatial, spatial)
    pred = decoder(xt, t, cond, ids, spatial=spatial)
    err = (pred.float() - (noise - x0).float()).pow(2).mean(dim=(1, 2))
    if loss_space == "sample":
        err = err * t.float() ** 2
    return err.mean()


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] pixels in [0, 1] (any device / dtype) -> RGB PIL images."""
    arrays = (pixels.detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def make_scheduler(steps: int, shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample(
    decoder: OrionDecoder,
    tokens: torch.Tensor,
    *,
    edit_tokens: torch.Tensor | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    shift: float | None = None,
    return_latents: bool = False,
) -> torch.Tensor:
    """Render images [B, 3, H, W] in [0, 1] from visual tokens [B, N, d]; deterministic per seed.

    ``seeds`` (one per row) draws each image's starting noise from its own generator, so an image
    depends on its own seed only, not on which batch or batch position it was rendered in (what a
    resumable export needs); without it the whole batch's noise comes from ``seed``.

    ``steps`` / ``cfg_scale`` / ``shift`` left as None take the values saved with the decoder
    (``config.extra``: ``sample_steps``, ``cfg_scale``, ``time_shift``), else 20 / 1 / 1."""
    extra = decoder.config.extra
    steps = int(extra.get("sample_steps", 20)) if steps is None else steps
    cfg_scale = float(extra.get("cfg_scale", 1.0)) if cfg_scale is None else cfg_scale
    shift = float(extra.get("time_shift", 1.0)) if shift is None else shift
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampling step")
    decoder.check_tokens(tokens)
    c = decoder.config
    b = tokens.shape[0]
    device = tokens.device
    dtype = next(decoder.transformer.parameters()).dtype
    shape = (c.grid * c.grid, c.in_channels)
    if seeds is None:
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))
    else:
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} token sets: give one seed per image")
        x = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = x.to(device=device, dtype=dtype)
    cond, ids = decoder.condition(tokens.to(dtype), None if edit_tokens is None else edit_tokens.to(dtype))
    spatial = decoder.spatial_condition(tokens.to(dtype), b)
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        null, _ = decoder.condition(None, batch=b)
        uncond = cond.clone()
        uncond[:, : null.shape[1]] = null.to(dtype)
        spatial_uncond = decoder.spatial_condition(tokens.to(dtype), b, null=True)
    scheduler = make_scheduler(steps, shift)
    for t in scheduler.timesteps:
        tt = torch.full((b,), float(t) / 1000.0, device=device, dtype=dtype)
        v = decoder(x, tt, cond, ids, spatial=spatial)
        if use_cfg:
            v_uncond = decoder(x, tt, uncond, ids, spatial=spatial_uncond)
            v = v_uncond + cfg_scale * (v - v_uncond)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    latents = decoder.unpack(x)
    return latents if return_latents else decoder.decode_latents(latents)
