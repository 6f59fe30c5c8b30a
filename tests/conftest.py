"""Shared fixtures: tiny random models built through the same code users run, and drawn images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from orion_mllm.demo import draw_shape
from orion_mllm.model.orion import OrionModel


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def micro_model() -> OrionModel:
    """A random-init ``micro`` ORION model (fp32, sdpa). Tests must not train it in place."""
    model = OrionModel.from_preset("micro", seed=0)
    model.eval()
    return model


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory, micro_model) -> str:
    """The micro model saved to disk with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("micro") / "model"
    micro_model.save_pretrained(path)
    return str(path)


@pytest.fixture
def images() -> dict[str, Image.Image]:
    """Distinct pictures of different sizes (understanding inputs get resized differently)."""
    wide = Image.new("RGB", (80, 48), (250, 250, 250))
    wide.paste(draw_shape("red", "circle", 48), (16, 0))
    return {
        "red_circle": draw_shape("red", "circle"),
        "blue_square": draw_shape("blue", "square", 40),
        "green_triangle": draw_shape("green", "triangle", 56),
        "wide": wide,
    }
