"""Helpers for the serving, inference and export tests: a random-init micro ORION pipeline with a matching
small decoder, in memory or saved as a model directory."""

from __future__ import annotations

import dataclasses

import torch

from orion_mllm.decoder.model import OrionDecoder, decoder_preset
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.model.orion import OrionModel


def micro_decoder(model: OrionModel) -> OrionDecoder:
    """A random small decoder matching ``model``'s tokens (seeded: the same one every time)."""
    spec = model.config.image_spec
    cfg = decoder_preset(
        "micro", token_dim=model.hidden_size, num_tokens=spec.gen_num_tokens, image_size=spec.gen_image_size
    )
    torch.manual_seed(0)
    return OrionDecoder(dataclasses.replace(cfg, patch_size=16, prediction="sample")).eval()


def save_with_decoder(model: OrionModel, root) -> str:
    """``model`` saved to ``root`` with :func:`micro_decoder` in ``root/decoder`` (a model directory)."""
    model.save_pretrained(root)
    micro_decoder(model).save_pretrained(root / "decoder")
    return str(root)


def micro_pipeline(seed: int = 5, sample_steps: int = 2) -> OrionPipeline:
    model = OrionModel.from_preset("micro", seed=seed).eval()
    decoder = micro_decoder(model)
    decoder.config.extra["sample_steps"] = sample_steps
    return OrionPipeline(model, decoder)
