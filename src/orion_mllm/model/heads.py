"""Vision heads: regress the next continuous visual token from the LLM's hidden state.

ORION (paper section 3.2, appendix A.3/A.4, ablation 4.4) attaches a *vision head* f to the final
hidden state h_t of the Qwen2.5-VL language model. At every position whose next token is a visual
token, f(h_t) is trained with MSE against v_{t+1}, the vision merger's output for that token. The
merger's output width equals the LLM hidden size, so every head here maps d -> d.

Heads are selected by name through a small registry so that recipes, checkpoints and the ablation
can switch them with one string:

- ``linear``    Linear(d, d): the Emu / Nexus-Gen baseline, a representational bottleneck that
                pushes "semantically blind" MSE pressure straight into h_t.
- ``mlp``       Linear(d, r*d) -> GELU -> Linear(r*d, d), r = ``mlp_ratio`` (default 8, A.4).
                ORION's default: a key-value-memory-like decoder that relaxes constraints on h_t.
- ``qformer``   a parameter-matched stack of pre-norm self-attention layers with ONE learned query
                token (section 4.4 / A.4), applied per position to the pair [h_t, query].
- ``layer_mix`` appendix A.3: a learnable softmax-weighted average of *all* layers' hidden states
                fed into the same MLP. Kept because the paper reports it trains to a lower loss but
                fails at inference; the ablation should be able to show that.

Every head treats positions independently: input [..., d] -> output [..., d] (``layer_mix``:
[L+1, ..., d] -> [..., d]), so the caller gathers the visual positions and applies the head to
those rows only. Model code here is single-device; parallelism is applied from outside.

Usage::

    cfg = HeadConfig(name="mlp", hidden_size=model.config.hidden_size)
    head = build_vision_head(cfg)
    pred = head(h_visual)                          # [n, d]
    json.dump(head.config.to_dict(), f)            # saved next to the weights
    head = build_vision_head(HeadConfig.from_dict(json.load(f)))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HEAD_NAMES",
    "HeadConfig",
    "LayerMixHead",
    "LinearHead",
    "MLPHead",
    "QFormerHead",
    "VisionHead",
    "build_vision_head",
    "mlp_head_param_count",
    "qformer_shape",
]

HEAD_NAMES: tuple[str, ...] = ("linear", "mlp", "qformer", "layer_mix")

# The Q-Former's feed-forward must stay at least this many times d wide when we pick the depth
# automatically; below that a "transformer layer" is mostly attention over two tokens and adding
# depth buys little. With mlp_ratio=8 this yields 2 layers with an FFN of ~1.75*d.
_QFORMER_MIN_FFN_RATIO = 1.0
# Preferred attention head width when qformer_heads is not given (Qwen2.5-VL's LLM uses 128, most
# small transformers 64; with a sequence of two tokens the exact choice matters little).
_QFORMER_TARGET_HEAD_DIM = 64


def _check_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; `True` as a width is always a bug in a config file.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _unknown_head_error(name: Any) -> ValueError:
    return ValueError(f"unknown vision head {name!r}; expected one of {', '.join(HEAD_NAMES)}")


# ----------------------------------------------------------------------------------------------
# Parameter budgets (kept as plain arithmetic so the qformer can be sized without building it)
# ----------------------------------------------------------------------------------------------


def mlp_head_param_count(hidden_size: int, mlp_ratio: int) -> int:
    """Exact parameter count of the ``mlp`` head: 2*r*d^2 + r*d + d."""
    d, inner = hidden_size, mlp_ratio * hidden_size
    return d * inner + inner + inner * d + d


def _qformer_fixed_params(d: int) -> int:
    # learned query (d) + final LayerNorm (2d) + output Linear(d, d) (d^2 + d)
    return d + 2 * d + d * d + d


def _qformer_layer_params(d: int, ffn: int) -> int:
    # 2 LayerNorms (4d) + fused qkv (3d^2 + 3d) + attention out (d^2 + d) + FFN (2*d*ffn + ffn + d)
    return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * ffn + ffn + d)


def _qformer_param_count(d: int, layers: int, ffn: int) -> int:
    return _qformer_fixed_params(d) + layers * _qformer_layer_params(d, ffn)


def _solve_ffn(d: int, mlp_ratio: int, layers: int) -> int:
    """FFN width that makes a ``layers``-deep qformer match the mlp head's parameter count."""
    budget = mlp_head_param_count(d, mlp_ratio) - _qformer_fixed_params(d)
    # Each layer costs _qformer_layer_params(d, 0) + ffn * (2d + 1); spread the budget evenly.
    raw = (budget / layers - _qformer_layer_params(d, 0)) / (2 * d + 1)
    # Multiples of 8 are kinder to matmul kernels; the rounding error (<= 4 * (2d+1) per layer) is
    # negligible once the FFN is that wide, and exact integer rounding is used for toy widths.
    return round(raw / 8) * 8 if raw >= 64 else round(raw)


def _default_heads(d: int) -> int:
    # The divisor of d whose head width is closest to the target (ties -> more heads).
    divisors = [h for h in range(1, d + 1) if d % h == 0]
    return min(divisors, key=lambda h: (abs(d // h - _QFORMER_TARGET_HEAD_DIM), -h))


def qformer_shape(
    hidden_size: int, mlp_ratio: int, layers: int | None = None, heads: int | None = None
) -> tuple[int, int, int]:
    """Return (layers, heads, ffn_size) of the qformer head parameter-matched to ``mlp``.

    Without ``layers``, the deepest stack whose FFN is still >= d wide is chosen (falling back to
    one layer with a narrower FFN for small ``mlp_ratio``). Raises ValueError when the requested
    depth cannot be matched (the attention blocks alone exceed the mlp's budget).
    """
    d = hidden_size
    _check_positive_int("hidden_size", d)
    _check_positive_int("mlp_ratio", mlp_ratio)
    if heads is None:
        heads = _default_heads(d)
    _check_positive_int("qformer_heads", heads)
    if d % heads:
        raise ValueError(f"qformer_heads={heads} must divide hidden_size={d}")

    if layers is None:
        layers = 1
        while _solve_ffn(d, mlp_ratio, layers + 1) >= _QFORMER_MIN_FFN_RATIO * d:
            layers += 1
    _check_positive_int("qformer_layers", layers)
    ffn = _solve_ffn(d, mlp_ratio, layers)
    if ffn < 1:
        max_layers = 0
        while _solve_ffn(d, mlp_ratio, max_layers + 1) >= 1:
            max_layers += 1
        hint = (
            f"use qformer_layers <= {max_layers}"
            if max_layers
            else "raise mlp_ratio (one attention layer alone costs more)"
        )
        raise ValueError(
            f"a qformer with {layers} layer(s) cannot be parameter-matched to the mlp head "
            f"(hidden_size={d}, mlp_ratio={mlp_ratio}, budget "
            f"{mlp_head_param_count(d, mlp_ratio)} parameters); {hint}"
        )
    return layers, heads, ffn


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Everything needed to rebuild a vision head; saved as JSON next to its weights.

    Keyword-only so that the field order (name first, as it reads in a config file) never gets
    confused with positional arguments.
    """

    name: str = "mlp"
    hidden_size: int
    mlp_ratio: int = 8
    qformer_layers: int | None = None  # None: chosen to match the mlp's parameter count
    qformer_heads: int | None = None  # None: a divisor of hidden_size with head width ~64
    num_hidden_states: int | None = None  # layer_mix only: num_layers + 1 (embeddings + layers)

    def __post_init__(self) -> None:
        # Fail when the config is read, not later in the middle of building a model.
        if self.name not in HEAD_NAMES:
            raise _unknown_head_error(self.name)
        _check_positive_int("hidden_size", self.hidden_size)
        _check_positive_int("mlp_ratio", self.mlp_ratio)
        for field in ("qformer_layers", "qformer_heads", "num_hidden_states"):
            value = getattr(self, field)
            if value is not None:
                _check_positive_int(field, value)
        if self.name == "qformer":
            qformer_shape(self.hidden_size, self.mlp_ratio, self.qformer_layers, self.qformer_heads)
        if self.name == "layer_mix" and self.num_hidden_states is None:
            raise ValueError(
                "the layer_mix head needs num_hidden_states = num_hidden_layers + 1 "
                "(the embedding output plus every decoder layer's output)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        if not isinstance(data, dict):
            raise ValueError(f"HeadConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HeadConfig key(s): {', '.join(unknown)}; expected keys: {', '.join(sorted(known))}"
            )
        if "hidden_size" not in data:
            raise ValueError("HeadConfig is missing the required key 'hidden_size'")
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


class VisionHead(nn.Module):
    """Base class: maps hidden states [..., d] to predicted next visual tokens [..., d]."""

    name: str = ""
    # True only for heads that consume every layer's hidden state (stacked on dim 0); the caller
    # then has to run the backbone with output_hidden_states and stack them.
    needs_all_layers: bool = False
    hidden_size: int

    @property
    def config(self) -> HeadConfig:  # pragma: no cover - every concrete head overrides it
        raise NotImplementedError

    def forward(self, hidden: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_width(self, hidden: Tensor) -> None:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{self.name} head expects hidden states of width {self.hidden_size} in the last "
                f"dimension, got shape {tuple(hidden.shape)}"
            )


class LinearHead(VisionHead):
    """Linear(d, d): the Emu / Nexus-Gen baseline."""

    name = "linear"

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(hidden_size, hidden_size)

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(name=self.name, hidden_size=self.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        self._check_width(hidden)
        return self.proj(hidden)


class MLPHead(VisionHead):
    """Linear(d, r*d) -> GELU -> Linear(r*d, d): ORION's default head (appendix A.4, r=8).

    Default torch inits keep the initial output at roughly a third of the input's scale, which
    suits the small-magnitude regression targets; warm-up (stage 1) trains it from there.
    """

    name = "mlp"

    def __init__(self, hidden_size: int, mlp_ratio: int = 8) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp_ratio = mlp_ratio
        self.fc1 = nn.Linear(hidden_size, mlp_ratio * hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * hidden_size, hidden_size)

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(name=self.name, hidden_size=self.hidden_size, mlp_ratio=self.mlp_ratio)

    def forward(self, hidden: Tensor) -> Tensor:
        self._check_width(hidden)
        return self.fc2(self.act(self.fc1(hidden)))


class _QFormerLayer(nn.Module):
    """Pre-norm transformer layer (self-attention + GELU FFN) over the 2-token [h_t, query] pair."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_size, hidden_size)

    def forward(self, x: Tensor, query_only: bool = False) -> Tensor:
        """x: [n, S, d] -> [n, S, d], or [n, 1, d] (the last slot only) when ``query_only``.

        The last layer only needs the query slot's output, so it skips the h_t slot's query row
        and FFN (keys/values still come from both slots).
        """
        n, s, d = x.shape
        hd = d // self.num_heads
        q, k, v = self.qkv(self.norm1(x)).view(n, s, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        if query_only:
            q, x = q[:, :, -1:], x[:, -1:]
        # No mask: both slots see each other (bidirectional, as in a Q-Former); no positional
        # encoding is needed because the learned query is distinguishable by its content.
        attn = F.scaled_dot_product_attention(q, k, v)  # [n, heads, s', hd]
        x = x + self.attn_out(attn.transpose(1, 2).reshape(n, q.shape[2], d))  # n may be 0
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class QFormerHead(VisionHead):
    """Parameter-matched Q-Former head (paper 4.4 / A.4): self-attention layers + one learned query.

    Per position, the sequence [h_t, query] goes through ``layers`` pre-norm transformer layers;
    the query slot's output, after a final LayerNorm and a Linear(d, d), is the prediction. h_t
    enters unprojected because it already has width d (a projection would only spend budget that
    the layers use better). The output Linear restores a free scale/direction after the final
    norm, which would otherwise pin every prediction to (roughly) the same norm.
    """

    name = "qformer"

    def __init__(
        self,
        hidden_size: int,
        mlp_ratio: int = 8,
        layers: int | None = None,
        heads: int | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp_ratio = mlp_ratio
        # Keep the overrides as given so that `config` round-trips to the same head.
        self._layers_override, self._heads_override = layers, heads
        self.num_layers, self.num_heads, self.ffn_size = qformer_shape(hidden_size, mlp_ratio, layers, heads)
        # Small init like BERT/ViT embeddings; the first pre-norm rescales it anyway.
        self.query = nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.layers = nn.ModuleList(
            _QFormerLayer(hidden_size, self.num_heads, self.ffn_size) for _ in range(self.num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(
            name=self.name,
            hidden_size=self.hidden_size,
            mlp_ratio=self.mlp_ratio,
            qformer_layers=self._layers_override,
            qformer_heads=self._heads_override,
        )

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, heads={self.num_heads}, ffn_size={self.ffn_size}"

    def forward(self, hidden: Tensor) -> Tensor:
        self._check_width(hidden)
        lead, d = hidden.shape[:-1], hidden.shape[-1]
        h = hidden.reshape(-1, 1, d)  # positions are independent rows
        query = self.query.to(h.dtype).expand(h.shape[0], 1, d)
        x = torch.cat([h, query], dim=1)  # [n, 2, d]: [h_t, learned query]
        for i, layer in enumerate(self.layers):
            x = layer(x, query_only=i == len(self.layers) - 1)
        return self.out(self.norm(x[:, -1])).reshape(*lead, d)


class LayerMixHead(VisionHead):
    """Appendix A.3: softmax-weighted average of all layers' hidden states, then the MLP head.

    Input is [num_hidden_states, ..., d] with num_hidden_states = num_layers + 1 (embedding output
    first, final layer last, as transformers' ``output_hidden_states`` returns them). The mixing
    logits start at zero, so the head starts as the MLP applied to the plain mean of the states.
    """

    name = "layer_mix"
    needs_all_layers = True

    def __init__(self, hidden_size: int, num_hidden_states: int, mlp_ratio: int = 8) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_hidden_states = num_hidden_states
        self.mlp_ratio = mlp_ratio
        self.layer_logits = nn.Parameter(torch.zeros(num_hidden_states))
        self.mlp = MLPHead(hidden_size, mlp_ratio)

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(
            name=self.name,
            hidden_size=self.hidden_size,
            mlp_ratio=self.mlp_ratio,
            num_hidden_states=self.num_hidden_states,
        )

    def layer_weights(self) -> Tensor:
        """Current mixing weights over the hidden states (fp32, sum to 1)."""
        return torch.softmax(self.layer_logits.float(), dim=0)

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.dim() < 2 or hidden.shape[0] != self.num_hidden_states:
            raise ValueError(
                f"layer_mix head expects {self.num_hidden_states} stacked hidden states "
                f"(embedding output + each decoder layer) in dim 0, i.e. shape "
                f"[{self.num_hidden_states}, ..., {self.hidden_size}]; got shape {tuple(hidden.shape)}"
            )
        self._check_width(hidden)
        # Softmax in fp32 (logits may be bf16 under mixed precision), mix in the input dtype.
        weights = self.layer_weights().to(hidden.dtype)
        mixed = torch.tensordot(weights, hidden, dims=([0], [0]))
        return self.mlp(mixed)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def _build_linear(c: HeadConfig) -> VisionHead:
    return LinearHead(c.hidden_size)


def _build_mlp(c: HeadConfig) -> VisionHead:
    return MLPHead(c.hidden_size, c.mlp_ratio)


def _build_qformer(c: HeadConfig) -> VisionHead:
    return QFormerHead(c.hidden_size, c.mlp_ratio, c.qformer_layers, c.qformer_heads)


def _build_layer_mix(c: HeadConfig) -> VisionHead:
    assert c.num_hidden_states is not None  # enforced by HeadConfig.__post_init__
    return LayerMixHead(c.hidden_size, c.num_hidden_states, c.mlp_ratio)


_REGISTRY = {
    "linear": _build_linear,
    "mlp": _build_mlp,
    "qformer": _build_qformer,
    "layer_mix": _build_layer_mix,
}
assert tuple(_REGISTRY) == HEAD_NAMES


def build_vision_head(config: HeadConfig) -> VisionHead:
    """Build the head named by ``config.name``; unknown names raise ValueError listing HEAD_NAMES."""
    builder = _REGISTRY.get(config.name)
    if builder is None:
        raise _unknown_head_error(config.name)
    return builder(config)
