"""Tests for the vision heads registry (orion_mllm.model.heads): shapes, gradients, parameter
budgets, layer_mix semantics, config round trips and a tiny regression fit for every head."""

from __future__ import annotations

import json

import pytest
import torch

from orion_mllm.model.heads import (
    HEAD_NAMES,
    HeadConfig,
    LayerMixHead,
    QFormerHead,
    VisionHead,
    build_vision_head,
    mlp_head_param_count,
    qformer_shape,
)

D = 32
NUM_STATES = 5  # 4 decoder layers + embedding output


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_head(name: str, d: int = D, **kw) -> VisionHead:
    if name == "layer_mix":
        kw.setdefault("num_hidden_states", NUM_STATES)
    return build_vision_head(HeadConfig(name=name, hidden_size=d, **kw))


def make_input(head: VisionHead, *lead: int, dtype=torch.float32) -> torch.Tensor:
    shape = (*lead, head.hidden_size)
    if head.needs_all_layers:
        shape = (NUM_STATES, *shape)
    return torch.randn(shape, dtype=dtype)


def test_head_names_and_flags():
    assert HEAD_NAMES == ("linear", "mlp", "qformer", "layer_mix")
    assert HeadConfig(hidden_size=D).name == "mlp"
    for name in HEAD_NAMES:
        head = make_head(name)
        assert isinstance(head, VisionHead)
        assert head.name == name
        assert head.needs_all_layers is (name == "layer_mix")


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("lead", [(7,), (2, 5), (0,)])
def test_output_shapes(name, lead):
    torch.manual_seed(0)
    head = make_head(name)
    out = head(make_input(head, *lead))
    assert out.shape == (*lead, D)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_bf16_matches_fp32(name):
    torch.manual_seed(0)
    head = make_head(name)
    x = make_input(head, 3, 4)
    ref = head(x)
    out = head.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gradients_reach_every_parameter_and_input(name):
    torch.manual_seed(0)
    head = make_head(name)
    x = make_input(head, 2, 3).requires_grad_(True)
    head(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in head.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_rows_are_independent(name):
    # Per-position heads: a row's output must not depend on which other rows share the batch.
    torch.manual_seed(0)
    head = make_head(name)
    x = make_input(head, 6)
    full = head(x)
    row = head(x[:, 2:3] if head.needs_all_layers else x[2:3])
    torch.testing.assert_close(row, full[2:3], atol=1e-6, rtol=1e-5)


def test_wrong_width_is_rejected():
    for name in HEAD_NAMES:
        head = make_head(name)
        x = torch.randn(NUM_STATES, 4, D + 1) if head.needs_all_layers else torch.randn(4, D + 1)
        with pytest.raises(ValueError, match="width"):
            head(x)


def test_linear_and_mlp_parameter_counts():
    for d in (16, 64, 96):
        assert count_parameters(make_head("linear", d)) == d * d + d
        for r in (1, 4, 8):
            expected = d * r * d + r * d + r * d * d + d
            assert mlp_head_param_count(d, r) == expected
            assert count_parameters(make_head("mlp", d, mlp_ratio=r)) == expected
            # layer_mix = the same MLP + one logit per hidden state
            assert count_parameters(make_head("layer_mix", d, mlp_ratio=r)) == expected + NUM_STATES


@pytest.mark.parametrize("d", [32, 64, 128, 256])
@pytest.mark.parametrize("ratio", [4, 8])
def test_qformer_is_parameter_matched(d, ratio):
    qformer = make_head("qformer", d, mlp_ratio=ratio)
    mlp = make_head("mlp", d, mlp_ratio=ratio)
    n_q, n_m = count_parameters(qformer), count_parameters(mlp)
    assert abs(n_q - n_m) <= 0.1 * n_m, (n_q, n_m)
    assert isinstance(qformer, QFormerHead)
    assert (qformer.num_layers, qformer.num_heads, qformer.ffn_size) == qformer_shape(d, ratio)
    assert d % qformer.num_heads == 0


def test_qformer_default_shape_is_a_stack():
    # mlp_ratio=8 leaves room for more than one layer: the paper calls it "stacked".
    layers, heads, ffn = qformer_shape(256, 8)
    assert layers >= 2 and ffn >= 256 and heads == 4


def test_qformer_overrides_and_errors():
    head = make_head("qformer", 64, qformer_layers=1, qformer_heads=8)
    assert (head.num_layers, head.num_heads) == (1, 8)
    mlp_count = count_parameters(make_head("mlp", 64))
    assert abs(count_parameters(head) - mlp_count) <= 0.1 * mlp_count
    with pytest.raises(ValueError, match="must divide"):
        HeadConfig(name="qformer", hidden_size=64, qformer_heads=5)
    with pytest.raises(ValueError, match="cannot be parameter-matched"):
        HeadConfig(name="qformer", hidden_size=64, qformer_layers=10)
    with pytest.raises(ValueError, match="qformer_layers"):
        HeadConfig(name="qformer", hidden_size=64, qformer_layers=0)


def test_qformer_last_layer_shortcut_matches_full_computation():
    # The last layer only computes the query slot; check against running it on both slots.
    torch.manual_seed(0)
    head = make_head("qformer")
    h = torch.randn(5, D)
    x = torch.cat([h[:, None], head.query.expand(5, 1, D)], dim=1)
    for layer in head.layers:
        x = layer(x)
    expected = head.out(head.norm(x[:, -1]))
    torch.testing.assert_close(head(h), expected, atol=1e-6, rtol=1e-5)


def test_layer_mix_weights_and_uniform_init():
    torch.manual_seed(0)
    head = make_head("layer_mix")
    assert isinstance(head, LayerMixHead)
    w = head.layer_weights()
    assert w.shape == (NUM_STATES,)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, torch.full((NUM_STATES,), 1 / NUM_STATES))
    states = torch.randn(NUM_STATES, 3, 4, D)
    torch.testing.assert_close(head(states), head.mlp(states.mean(0)), atol=1e-6, rtol=1e-5)
    # After moving the logits the weights still sum to one and the mix follows them.
    with torch.no_grad():
        head.layer_logits.copy_(torch.randn(NUM_STATES))
    w = head.layer_weights()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    mixed = (w[:, None, None, None] * states).sum(0)
    torch.testing.assert_close(head(states), head.mlp(mixed), atol=1e-5, rtol=1e-5)


def test_layer_mix_rejects_wrong_number_of_states():
    head = make_head("layer_mix")
    with pytest.raises(ValueError, match=f"expects {NUM_STATES} stacked hidden states"):
        head(torch.randn(NUM_STATES - 1, 3, D))
    with pytest.raises(ValueError, match="stacked hidden states"):
        head(torch.randn(3, D))  # forgot to stack: [n, d] instead of [L+1, n, d]
    with pytest.raises(ValueError, match="num_hidden_states"):
        HeadConfig(name="layer_mix", hidden_size=D)


def test_unknown_head_name():
    with pytest.raises(ValueError, match="linear, mlp, qformer, layer_mix"):
        HeadConfig(name="transformer", hidden_size=D)
    # build_vision_head checks too (e.g. for a config object that bypassed validation)
    cfg = HeadConfig(hidden_size=D)
    object.__setattr__(cfg, "name", "bogus")
    with pytest.raises(ValueError, match=r"'bogus'.*linear, mlp, qformer, layer_mix"):
        build_vision_head(cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        HeadConfig(hidden_size=D),
        HeadConfig(name="linear", hidden_size=16),
        HeadConfig(name="qformer", hidden_size=64, mlp_ratio=4, qformer_layers=1, qformer_heads=2),
        HeadConfig(name="layer_mix", hidden_size=D, num_hidden_states=NUM_STATES),
    ],
)
def test_head_config_round_trip(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    assert HeadConfig.from_dict(data) == cfg
    # A built head reports a config that rebuilds the same architecture.
    head = build_vision_head(cfg)
    assert head.config == cfg
    rebuilt = build_vision_head(HeadConfig.from_dict(head.config.to_dict()))
    rebuilt.load_state_dict(head.state_dict())


def test_head_config_is_strict():
    data = HeadConfig(hidden_size=D).to_dict()
    with pytest.raises(ValueError, match="mlp_ration, zzz"):
        HeadConfig.from_dict({**data, "mlp_ration": 4, "zzz": 1})
    with pytest.raises(ValueError, match="hidden_size"):
        HeadConfig.from_dict({"name": "mlp"})
    with pytest.raises(ValueError, match="hidden_size"):
        HeadConfig(hidden_size=0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        HeadConfig(hidden_size=D, mlp_ratio=True)


def _fit(name: str, seed: int = 0, steps: int = 300) -> tuple[float, float]:
    """Fit a head to a fixed random, nearly linear, small-magnitude target; return (first, last) loss."""
    torch.manual_seed(seed)
    n = 48
    head = make_head(name)
    x = torch.randn(n, D)
    a = torch.randn(D, D) / D**0.5
    target = 0.1 * torch.tanh(x @ a)  # small-magnitude, like the visual-token targets
    inp = x
    if head.needs_all_layers:
        # the last state carries the signal; the others are noisy versions of it
        inp = torch.stack([x + 0.5 * torch.randn(n, D) for _ in range(NUM_STATES - 1)] + [x])
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(head(inp), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_each_head_fits_a_small_regression(name):
    first, last = _fit(name)
    assert last * 10 <= first, (name, first, last)


def test_regression_is_deterministic():
    assert _fit("qformer", seed=3, steps=20) == _fit("qformer", seed=3, steps=20)
