"""Helpers for the serving tests: a random-init micro ORION pipeline with a matching small decoder."""

from __future__ import annotations

import dataclasses

import torch

from orion_mllm.decoder.model import OrionDecoder, decoder_preset
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.model.orion import OrionModel


def micro_pipeline(seed: int = 5, sample_steps: int = 2) -> OrionPipeline:
    model = OrionModel.from_preset("micro", seed=seed).eval()
    spec = model.config.image_spec
    cfg = decoder_preset(
        "micro", token_dim=model.hidden_size, num_tokens=spec.gen_num_tokens, image_size=spec.gen_image_size
    )
    torch.manual_seed(0)
    decoder = OrionDecoder(dataclasses.replace(cfg, patch_size=16, prediction="sample")).eval()
    decoder.config.extra["sample_steps"] = sample_steps
    return OrionPipeline(model, decoder)
