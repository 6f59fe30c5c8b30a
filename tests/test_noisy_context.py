"""Noisy context: generated images' teacher-forced inputs perturbed; targets and user images never."""

from __future__ import annotations

import pytest
import torch

from orion_mllm.model.orion import input_noise


def _layout():
    # Three images of 4, 9 and 4 tokens (grids 1x4x4, 1x6x6, 1x4x4 at merge 2); images 0 and 2 are generated.
    grid = torch.tensor([[1, 4, 4], [1, 6, 6], [1, 4, 4]])
    target_index = torch.cat([torch.arange(0, 4), torch.arange(13, 17)])
    return grid, target_index, torch.randn(17, 8)


def test_fixed_schedule_is_exactly_gaussian_at_that_std_on_generated_images_only():
    grid, target_index, tokens = _layout()
    torch.manual_seed(0)
    noise = input_noise(tokens, target_index, grid, 2, 0.3)
    torch.manual_seed(0)
    expect = torch.zeros_like(tokens)
    expect[target_index] = torch.randn(8, 8) * 0.3
    assert torch.equal(noise, expect)
    assert torch.count_nonzero(noise[4:13]) == 0  # the user image is never corrupted


def test_uniform_schedule_draws_one_level_per_generated_image():
    grid, target_index, tokens = _layout()
    torch.manual_seed(1)
    noise = input_noise(tokens, target_index, grid, 2, 0.5, schedule="uniform")
    torch.manual_seed(1)
    levels = 0.5 * torch.rand(3)
    draws = torch.randn(8, 8)
    torch.testing.assert_close(noise[:4], draws[:4] * levels[0])
    torch.testing.assert_close(noise[13:], draws[4:] * levels[2])
    assert torch.count_nonzero(noise[4:13]) == 0
    assert levels[0] != levels[2] and (levels <= 0.5).all()


def test_unknown_schedule_is_refused():
    grid, target_index, tokens = _layout()
    with pytest.raises(ValueError, match="noise schedule 'cosine'"):
        input_noise(tokens, target_index, grid, 2, 0.1, schedule="cosine")
