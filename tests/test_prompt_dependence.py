"""CI-sized check of issue 16: a micro model trained a few hundred steps with the shipped generation
settings draws *different* pictures for different prompts (the mean-image failure draws one).

Measured with ``benchmarks/micro_prompt_dependence.py`` (benchmarks/SMALL_SCALE.md): after 300 steps the
free-running outputs of 16 distinct captions spread 0.059 of the targets' own spread with the shipped
settings, 0.000008 with the settings shipped before (MSE weight 1 on raw tokens, fixed noise 0.1,
LR 5e-4): the threshold below, 1% of the data's spread, separates the two by orders of magnitude.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "micro_prompt_dependence.py"


def _bench():
    spec = importlib.util.spec_from_file_location("micro_prompt_dependence", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_micro_model_with_the_shipped_settings_draws_prompt_dependent_tokens(tmp_path):
    result = _bench().train_and_measure(tmp_path, steps=300)
    assert result["target_spread"] > 0
    assert result["spread_ratio"] > 0.01, result
