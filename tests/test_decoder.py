"""Diffusion decoder: flow-matching objective, sampler, persistence, training run, CLI and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from orion_mllm.data.shapes.datasets import write_shapes_dataset
from orion_mllm.decoder.coarse import CoarseFit
from orion_mllm.decoder.flow import flow_matching_loss, make_scheduler, sample
from orion_mllm.decoder.model import DecoderConfig, OrionDecoder, decoder_preset
from orion_mllm.train.decoder_trainer import DecoderTrainer
from orion_mllm.train.recipe import load_recipe
from train_utils import REPO, checkpoint_format


def _micro(prediction: str = "velocity", **kw) -> OrionDecoder:
    torch.manual_seed(0)
    cfg = decoder_preset("micro", token_dim=32, num_tokens=9, image_size=48)
    import dataclasses

    return OrionDecoder(dataclasses.replace(cfg, patch_size=8, prediction=prediction, **kw))


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    dec = _micro()
    latents = torch.rand(8, 3, 48, 48) * 2 - 1
    tokens = torch.randn(8, 9, 32)
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)

    def loss():
        return flow_matching_loss(
            dec, latents, tokens, cond_dropout=0.0, generator=torch.Generator().manual_seed(5)
        )

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_sample_space_loss_is_the_clean_sample_error():
    """loss_space="sample" scores the clean image the network implies (x_0 = x_t - t v), so each noise
    level weighs alike; "velocity" is FLUX's velocity error. Both from the same draws."""
    dec = _micro("sample")
    latents = torch.rand(4, 3, 48, 48) * 2 - 1
    tokens = torch.randn(4, 9, 32)

    def draws():
        g = torch.Generator().manual_seed(11)
        x0 = dec.pack(latents)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(4, generator=g))  # FLUX's logit-normal times (shift 1)
        return x0, noise, t

    x0, noise, t = draws()
    assert bool((t > 0.05).all())  # the implied-x_0 identity below holds above the clamp
    xt = (1 - t.view(4, 1, 1)) * x0 + t.view(4, 1, 1) * noise
    cond, ids = dec.condition(tokens)
    with torch.no_grad():
        v = dec(xt, t, cond, ids)
        got = {
            space: flow_matching_loss(dec, latents, tokens, cond_dropout=0.0, loss_space=space,
                                      generator=torch.Generator().manual_seed(11)).item()
            for space in ("velocity", "sample")
        }  # fmt: skip
    implied_x0 = xt - t.view(4, 1, 1) * v
    assert got["sample"] == pytest.approx(((implied_x0 - x0) ** 2).mean().item(), rel=1e-4)
    assert got["velocity"] == pytest.approx(((v - (noise - x0)) ** 2).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="loss_space='pixels'"):
        flow_matching_loss(dec, latents, tokens, loss_space="pixels")


@pytest.mark.parametrize("prediction", ["velocity", "sample"])
def test_one_step_sampler_is_one_analytic_euler_step(prediction):
    dec = _micro(prediction).eval()
    tokens = torch.randn(2, 9, 32)
    got = sample(dec, tokens, steps=1, seed=3, return_latents=True)
    # By hand: x_1 = noise (same generator draw), t = 1, x_0 = x_1 + (0 - 1) * v(x_1, 1).
    x1 = torch.randn(
        2, dec.config.grid**2, dec.config.in_channels, generator=torch.Generator().manual_seed(3)
    )
    cond, ids = dec.condition(tokens)
    with torch.no_grad():
        v = dec(x1, torch.ones(2), cond, ids)
    torch.testing.assert_close(got, dec.unpack(x1 - v))
    assert make_scheduler(1).sigmas.tolist() == [1.0, 0.0]


def test_same_seed_same_image_and_cfg_changes_it():
    dec = _micro().eval()
    with torch.no_grad():
        dec.null_tokens.normal_()  # a trained null condition differs from the real ones
    tokens = torch.randn(2, 9, 32)
    a = sample(dec, tokens, steps=4, seed=7)
    b = sample(dec, tokens, steps=4, seed=7)
    c = sample(dec, tokens, steps=4, seed=8)
    d = sample(dec, tokens, steps=4, seed=7, cfg_scale=3.0)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert a.shape == (2, 3, 48, 48) and a.min() >= 0 and a.max() <= 1
    # Batched == one at a time (the noise of a batch is one draw, so compare via the latents path).
    e = sample(dec, tokens[:1], steps=4, seed=7)
    assert e.shape == (1, 3, 48, 48)


def _fitted_coarse_decoder(rank: int = 8, n: int = 120, noise: float = 0.0, seed: int = 0):
    """A micro decoder whose coarse map is fitted on tokens -> latents that follow a known map of rank
    ``rank`` (plus optional noise); returns the decoder, the fit's stats, tokens and latents."""
    dec = _micro("sample", spatial_cond=16, coarse_rank=rank)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 9, 32, generator=g) * 2 + 0.5
    true_in = torch.randn(9 * 32, rank, generator=g) / 17
    true_out = torch.randn(rank, 3 * 48 * 48, generator=g) / 3
    mean = torch.rand(3 * 48 * 48, generator=g) - 0.5
    flat = (tokens.reshape(n, -1) - 0.5) @ true_in @ true_out + mean
    latents = (flat + noise * torch.randn(flat.shape, generator=g)).reshape(n, 3, 48, 48)
    fit = CoarseFit(dec)
    for i in range(0, n, 50):  # streamed in batches, like the trainer
        fit.update(tokens[i : i + 50], latents[i : i + 50])
    return dec, fit.solve(ridge=1e-6), tokens, latents


def test_coarse_fit_recovers_a_linear_map():
    dec, stats, tokens, latents = _fitted_coarse_decoder(rank=8)
    assert stats["images"] == 120 and stats["train_r2"] > 0.9999 and stats["rank_energy_kept"] > 0.9999
    with torch.no_grad():
        got = dec.coarse_latents(tokens[:5])
        # The null condition keeps the coarse image and drops the per-patch token features.
        null = dec.spatial_condition(tokens[:2], 2, null=True)
        full = dec.spatial_condition(tokens[:2], 2)
    torch.testing.assert_close(got, latents[:5], atol=1e-3, rtol=1e-3)
    assert null[..., :16].abs().max() == 0 and torch.equal(null[..., 16:], full[..., 16:])
    assert full[..., :16].abs().max() > 0
    # Noise the map cannot explain lowers R^2 (reported, from the statistics alone) accordingly.
    _, noisy, _, _ = _fitted_coarse_decoder(rank=8, noise=1.0)
    assert 0.5 < noisy["train_r2"] < 0.99
    # A rank below the map's keeps part of it, and says so.
    dec4 = _micro("sample", coarse_rank=4)
    fit = CoarseFit(dec4)
    fit.update(tokens, latents)
    low = fit.solve(ridge=1e-6)
    assert low["rank_energy_kept"] < 0.95 and low["train_r2"] < 0.95
    # The sample-predicting network starts from the coarse image: with its output layer zeroed,
    # the predicted clean sample is exactly the coarse estimate.
    with torch.no_grad():
        dec.transformer.proj_out.weight.zero_()
        dec.transformer.proj_out.bias.zero_()
        x0 = dec.pack(latents[:2])
        noise = torch.randn(x0.shape)
        t = torch.full((2,), 0.7)
        xt = (1 - 0.7) * x0 + 0.7 * noise
        cond, ids = dec.condition(tokens[:2])
        v = dec(xt, t, cond, ids, spatial=dec.spatial_condition(tokens[:2], 2))
    torch.testing.assert_close(dec.unpack(xt - 0.7 * v), dec.coarse_latents(tokens[:2]), atol=1e-4, rtol=1e-4)


def test_coarse_estimate_errors():
    with pytest.raises(ValueError, match="coarse_rank=0: nothing to fit"):
        CoarseFit(_micro())
    with pytest.raises(ValueError, match="coarse_rank needs latent='pixel'"):
        DecoderConfig(token_dim=8, num_tokens=9, image_size=48, latent="vae", vae={}, coarse_rank=4)
    with pytest.raises(ValueError, match=r"num_tokens x token_dim <= 16384.*81 x 3584"):
        DecoderConfig(token_dim=3584, num_tokens=81, image_size=48, coarse_rank=4)
    with pytest.raises(ValueError, match="need at least 2 images"):
        CoarseFit(_micro(coarse_rank=4)).solve()
    with pytest.raises(ValueError, match="null condition keeps the coarse estimate: pass the tokens"):
        _micro(coarse_rank=4).spatial_condition(None, 2)


@pytest.mark.parametrize("coarse", [False, True])
def test_save_load_round_trip_gives_identical_samples(tmp_path, coarse):
    dec = _fitted_coarse_decoder()[0].eval() if coarse else _micro("sample").eval()
    tokens = torch.randn(1, 9, 32)
    dec.save_pretrained(tmp_path / "d")
    back = OrionDecoder.from_pretrained(tmp_path / "d").eval()
    assert back.config == dec.config
    if coarse:
        assert (
            torch.equal(back.coarse_out.weight, dec.coarse_out.weight)
            and back.coarse_token_mean.abs().sum() > 0
        )
    assert torch.equal(sample(dec, tokens, steps=3, seed=1), sample(back, tokens, steps=3, seed=1))


def test_bad_inputs_raise_clear_errors(tmp_path):
    dec = _micro()
    with pytest.raises(ValueError, match=r"expected shape \[batch, 9, 32\].*got \[2, 9, 31\]"):
        sample(dec, torch.randn(2, 9, 31), steps=1)
    with pytest.raises(ValueError, match=r"expected shape \[batch, 9, 32\].*got \[9, 32\]"):
        sample(dec, torch.randn(9, 32), steps=1)
    with pytest.raises(FileNotFoundError, match="not a decoder directory"):
        OrionDecoder.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown decoder preset 'huge'"):
        decoder_preset("huge", token_dim=8, num_tokens=9, image_size=48)
    with pytest.raises(ValueError, match="not a square grid"):
        DecoderConfig(token_dim=8, num_tokens=10, image_size=48)
    with pytest.raises(ValueError, match="steps=0"):
        sample(dec, torch.randn(1, 9, 32), steps=0)


LEARNING_CHECK_STEPS = 300


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp(min=1e-10)))


def test_micro_decoder_learns_to_reconstruct_in_a_minute(tmp_path):
    """300 steps inside the test (~9 s; measured 4.9 -> 10.7 dB): training-image PSNR rises >= 3 dB."""
    from orion_mllm.data.shapes.render import render_scene
    from orion_mllm.data.shapes.world import sample_scene

    rng = __import__("random").Random(0)
    images = [render_scene(sample_scene(rng, 1 + k % 2), 48) for k in range(16)]
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
    )
    tokens = torch.randn(16, 9, 32)  # stand-in visual tokens: a distinct code per image
    dec = _micro("sample")
    latents = dec.encode_images(pixels)

    def psnr() -> float:
        dec.eval()
        out = sample(dec, tokens, steps=8, seed=0)
        dec.train()
        return _psnr(out, pixels)

    before = psnr()
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    # A fixed number of steps (not a time budget) so the result does not depend on the machine's load.
    t0, steps = time.time(), 0
    while steps < LEARNING_CHECK_STEPS:
        loss = flow_matching_loss(dec, latents, tokens, cond_dropout=0.0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    after = psnr()
    assert after >= before + 3, (
        f"PSNR {before:.2f} -> {after:.2f} dB after {steps} steps ({time.time() - t0:.0f} s)"
    )


@pytest.fixture(scope="module")
def shapes48(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dec") / "data"
    write_shapes_dataset(
        root, size=48, n_und=8, n_gen=24, n_edit=8, n_interleaved=0, n_heldout=0, progress=False
    )
    return root


def _decoder_recipe(root, *extra):
    return load_recipe(
        REPO / "recipes/shapes/micro/decoder.yaml",
        [f"data_root={root}", "encoder=preset:micro", "train.global_batch_size=8", "shapes_data=", *extra],
    )


def test_decoder_training_run_resumes_exports_and_decodes(tmp_path, shapes48):
    straight = DecoderTrainer(_decoder_recipe(shapes48, "max_steps=4", "checkpoint.every=2"), tmp_path / "a",
                              tensorboard=False).run()  # fmt: skip

    class Stop(Exception):
        pass

    def stop(trainer, step, rec):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        DecoderTrainer(_decoder_recipe(shapes48, "max_steps=4", "checkpoint.every=2"), tmp_path / "b",
                       tensorboard=False, callbacks=[stop]).run()  # fmt: skip
    resumed = DecoderTrainer(_decoder_recipe(shapes48, "max_steps=4", "checkpoint.every=2"), tmp_path / "b",
                             tensorboard=False).run()  # fmt: skip
    la = [json.loads(x)["loss"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4
    # The checkpoint format of the code before the shared run loop (commit 9d20f6c): see the fixture.
    fixture = Path(__file__).parent / "fixtures/resume_9d20f6c/decoder_checkpoint_format.json"
    want = json.loads(fixture.read_text())
    assert checkpoint_format(tmp_path / "a/checkpoints/step_00000002") == want
    a, b = OrionDecoder.from_pretrained(straight), OrionDecoder.from_pretrained(resumed)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert a.config.extra["encoder"] == "preset:micro" and a.config.num_tokens == 9

    # orion decode renders a tokens file with the exported decoder.
    save_file({"tokens": torch.randn(9, a.config.token_dim)}, tmp_path / "t.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "orion_mllm.cli", "decode", "--decoder", str(straight), "--tokens",
         str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "out.png"), "--steps", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size == (48, 48)
    bad = subprocess.run(
        [sys.executable, "-m", "orion_mllm.cli", "decode", "--decoder", str(tmp_path / "nope"), "--tokens",
         str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "not a decoder directory" in bad.stderr
