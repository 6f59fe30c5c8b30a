"""Nexus-Gen (DiffSynth ``FluxDiT`` + ReLU adapter) -> ``OrionDecoder`` conversion, checked numerically.

The reference below is an independent re-implementation of DiffSynth-Studio's ``FluxDiT.forward``
(``diffsynth/models/flux_dit.py``) and Nexus-Gen's adapter, run directly on the source-named weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from orion_mllm.decoder.convert import (
    convert_nexus_gen_decoder,
    convert_nexus_gen_state_dict,
    infer_config,
    load_checkpoint,
)
from orion_mllm.decoder.model import DecoderConfig, OrionDecoder

D, HEADS, HD, J, P, T, A = 32, 2, 16, 32, 24, 20, 48  # width, heads, head dim, joint, pooled, token, adapter
AXES = (4, 6, 6)
NUM_TOKENS, IMAGE, PATCH = 4, 8, 2
C = 3 * PATCH * PATCH


def small_config(guidance: bool = True) -> DecoderConfig:
    return DecoderConfig(
        token_dim=T, num_tokens=NUM_TOKENS, image_size=IMAGE, latent="pixel", patch_size=PATCH, num_layers=1,
        num_single_layers=1, num_attention_heads=HEADS, attention_head_dim=HD, axes_dims_rope=AXES,
        joint_attention_dim=J, adapter_hidden=A, pooled_projection_dim=P, guidance_embeds=guidance,
    )  # fmt: skip


def source_state(guidance: bool = True, seed: int = 0, legacy: bool = False) -> dict[str, torch.Tensor]:
    """Random weights under Nexus-Gen's checkpoint names (``pipe.dit.*`` + ``adapter.{0,1,3,4}.*``)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder": (D, C),
        "context_embedder": (D, J),
        "time_embedder.timestep_embedder.0": (D, 256),
        "time_embedder.timestep_embedder.2": (D, D),
        "pooled_text_embedder.0": (D, P),
        "pooled_text_embedder.2": (D, D),
        "final_norm_out.linear": (2 * D, D),
        "final_proj_out": (C, D),
        "blocks.0.norm1_a.linear": (6 * D, D),
        "blocks.0.norm1_b.linear": (6 * D, D),
        "blocks.0.attn.a_to_qkv": (3 * D, D),
        "blocks.0.attn.b_to_qkv": (3 * D, D),
        "blocks.0.attn.a_to_out": (D, D),
        "blocks.0.attn.b_to_out": (D, D),
        "blocks.0.ff_a.0": (4 * D, D),
        "blocks.0.ff_a.2": (D, 4 * D),
        "blocks.0.ff_b.0": (4 * D, D),
        "blocks.0.ff_b.2": (D, 4 * D),
        "single_blocks.0.norm.linear": (3 * D, D),
        "single_blocks.0.to_qkv_mlp": (7 * D, D),
        "single_blocks.0.proj_out": (D, 5 * D),
    }
    if guidance:
        shapes["guidance_embedder.timestep_embedder.0"] = (D, 256)
        shapes["guidance_embedder.timestep_embedder.2"] = (D, D)
    dit_prefix, ad_prefix = ("", "") if legacy else ("pipe.dit.", "adapter.")
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        sd[f"{dit_prefix}{name}.weight"] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        sd[f"{dit_prefix}{name}.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    qk_norms = [f"blocks.0.attn.norm_{w}_{s}" for w in "qk" for s in "ab"]
    for name in [*qk_norms, "single_blocks.0.norm_q_a", "single_blocks.0.norm_k_a"]:
        sd[f"{dit_prefix}{name}.weight"] = 1 + 0.2 * torch.randn(HD, generator=g)
    for idx, shape in (("0", (A, T)), ("3", (J, A))):
        sd[f"{ad_prefix}{idx}.weight"] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        sd[f"{ad_prefix}{idx}.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    for idx, width in (("1", A), ("4", J)):
        sd[f"{ad_prefix}{idx}.weight"] = 1 + 0.2 * torch.randn(width, generator=g)
        sd[f"{ad_prefix}{idx}.bias"] = 0.1 * torch.randn(width, generator=g)
    return sd


# ---------------------------------------------------------------------------- reference (source layout)


def _lin(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # flip_sin_to_cos=True


def _embed(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return _lin(sd, f"{name}.2", F.silu(_lin(sd, f"{name}.0", x)))


def _rope_angles(ids: torch.Tensor) -> torch.Tensor:
    """[N, 3] ids -> [N, head_dim / 2] rotation angles, axis by axis (theta 10000)."""
    parts = []
    for axis, dim in enumerate(AXES):
        omega = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(ids[:, axis, None].double() * omega[None])
    return torch.cat(parts, dim=-1)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by the angles; x is [B, H, N, head_dim]."""
    cos, sin = angles.cos().float(), angles.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)


def _heads(x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, HEADS, HD).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    q, k = _rotate(q, angles), _rotate(k, angles)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD), dim=-1)
    out = w @ v
    b, _, n, _ = out.shape
    return out.transpose(1, 2).reshape(b, n, HEADS * HD)


def _qkv(sd: dict, prefix: str, y: torch.Tensor, nq: str, nk: str):
    q, k, v = (_heads(part) for part in y.split(D, dim=-1))
    return _rms(q, sd[f"{prefix}{nq}.weight"]), _rms(k, sd[f"{prefix}{nk}.weight"]), v


def reference_dit(sd, image, sigma, prompt_emb, pooled, guidance, text_ids) -> torch.Tensor:
    """DiffSynth ``FluxDiT.forward`` on [B, C, H, W] latents, ``timestep = sigma * 1000``, 2x2 patches."""
    b, ch, h, w = image.shape
    timestep = sigma * 1000
    temb = _embed(sd, "time_embedder.timestep_embedder", _sinusoid(timestep))
    temb = temb + _embed(sd, "pooled_text_embedder", pooled)
    if "guidance_embedder.timestep_embedder.0.weight" in sd:
        temb = temb + _embed(sd, "guidance_embedder.timestep_embedder", _sinusoid(guidance * 1000))
    act = F.silu(temb)
    # patchify "B C (H P) (W Q) -> B (H W) (C P Q)" and (0, row, col) image ids
    x = image.reshape(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    angles = _rope_angles(torch.cat([text_ids, image_ids], dim=0))
    a = _lin(sd, "x_embedder", x)
    t = _lin(sd, "context_embedder", prompt_emb)
    nt = t.shape[1]

    p = "blocks.0."
    ma = _lin(sd, p + "norm1_a.linear", act)[:, None].chunk(6, dim=-1)
    mb = _lin(sd, p + "norm1_b.linear", act)[:, None].chunk(6, dim=-1)
    qa, ka, va = _qkv(sd, p + "attn.", _lin(sd, p + "attn.a_to_qkv", _layer_norm(a) * (1 + ma[1]) + ma[0]),
                      "norm_q_a", "norm_k_a")  # fmt: skip
    qb, kb, vb = _qkv(sd, p + "attn.", _lin(sd, p + "attn.b_to_qkv", _layer_norm(t) * (1 + mb[1]) + mb[0]),
                      "norm_q_b", "norm_k_b")  # fmt: skip
    joint = _attend(torch.cat([qb, qa], 2), torch.cat([kb, ka], 2), torch.cat([vb, va], 2), angles)
    a = a + ma[2] * _lin(sd, p + "attn.a_to_out", joint[:, nt:])
    t = t + mb[2] * _lin(sd, p + "attn.b_to_out", joint[:, :nt])
    for stream, m, ff in ((a, ma, "ff_a"), (t, mb, "ff_b")):
        hidden = _layer_norm(stream) * (1 + m[4]) + m[3]
        out = _lin(sd, f"{p}{ff}.2", F.gelu(_lin(sd, f"{p}{ff}.0", hidden), approximate="tanh"))
        if ff == "ff_a":
            a = a + m[5] * out
        else:
            t = t + m[5] * out

    p = "single_blocks.0."
    xs = torch.cat([t, a], dim=1)
    shift, scale, gate = _lin(sd, p + "norm.linear", act)[:, None].chunk(3, dim=-1)
    y = _lin(sd, p + "to_qkv_mlp", _layer_norm(xs) * (1 + scale) + shift)
    q, k, v = _qkv(sd, p, y[..., : 3 * D], "norm_q_a", "norm_k_a")
    mixed = torch.cat([_attend(q, k, v, angles), F.gelu(y[..., 3 * D :], approximate="tanh")], dim=-1)
    xs = xs + gate * _lin(sd, p + "proj_out", mixed)

    a = xs[:, nt:]
    scale, shift = _lin(sd, "final_norm_out.linear", act)[:, None].chunk(2, dim=-1)
    out = _lin(sd, "final_proj_out", _layer_norm(a) * (1 + scale) + shift)
    return out.reshape(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


def reference_adapter(ad: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Nexus-Gen: Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm (nn.LayerNorm's default eps)."""
    x = _lin(ad, "0", tokens)
    x = F.relu(F.layer_norm(x, (x.shape[-1],), ad["1.weight"], ad["1.bias"]))
    x = _lin(ad, "3", x)
    return F.layer_norm(x, (x.shape[-1],), ad["4.weight"], ad["4.bias"])


def _dit_and_adapter(src: dict) -> tuple[dict, dict]:
    dit = {k.removeprefix("pipe.dit."): v for k, v in src.items() if k.startswith("pipe.dit.")}
    ad = {k.removeprefix("adapter."): v for k, v in src.items() if k.startswith("adapter.")}
    return dit, ad


def _converted(config: DecoderConfig, src: dict, pooled: torch.Tensor) -> OrionDecoder:
    decoder = OrionDecoder(config)
    decoder.load_state_dict(convert_nexus_gen_state_dict(src, config, pooled_embedding=pooled), strict=True)
    return decoder.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    tokens = torch.randn(2, NUM_TOKENS, T, generator=g)
    sigma = torch.tensor([0.3, 0.85])
    pooled = torch.randn(P, generator=g)
    return image, tokens, sigma, pooled


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("ids", ["zeros", "grid"])
def test_velocity_matches_diffsynth_reference(guidance: bool, ids: str) -> None:
    torch.manual_seed(0)
    config = small_config(guidance)
    src = source_state(guidance)
    image, tokens, sigma, pooled = _inputs()
    decoder = _converted(config, src, pooled)
    dit, ad = _dit_and_adapter(src)
    # Nexus-Gen's generation decoder uses all-zero text ids; also check ORION's (1, row, col) ids.
    cond_ids = torch.zeros(NUM_TOKENS, 3) if ids == "zeros" else decoder.cond_ids
    g = torch.full((2,), 3.5)
    with torch.no_grad():
        cond = reference_adapter(ad, tokens)
        ref = reference_dit(dit, image, sigma, cond, pooled.expand(2, -1), g, cond_ids)
        ours = decoder.unpack(decoder(decoder.pack(image), sigma, cond, cond_ids, g if guidance else None))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().mean() > 1e-2  # not a trivially small output


def test_end_to_end_through_adapter_with_relu() -> None:
    """cond = decoder.adapter(tokens): the converted decoder (config inferred from the checkpoint,
    so its adapter uses ReLU as Nexus-Gen's does) reproduces the source forward end to end."""
    src = source_state()
    image, tokens, sigma, pooled = _inputs(2)
    inferred = infer_config(src, num_tokens=NUM_TOKENS, image_size=IMAGE, axes_dims_rope=AXES)
    assert inferred.extra["adapter_act"] == "relu"
    decoder = _converted(inferred, src, pooled)
    dit, ad = _dit_and_adapter(src)
    ids = torch.zeros(NUM_TOKENS, 3)
    with torch.no_grad():
        ref = reference_dit(dit, image, sigma, reference_adapter(ad, tokens), pooled.expand(2, -1),
                            torch.full((2,), 3.5), ids)  # fmt: skip
        ours = decoder.unpack(decoder(decoder.pack(image), sigma, decoder.adapter(tokens), ids))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_converted_adapter_activation_matches_nexus_gen() -> None:
    src = source_state()
    config = infer_config(src, num_tokens=NUM_TOKENS, image_size=IMAGE, axes_dims_rope=AXES)
    decoder = _converted(config, src, torch.zeros(P))
    tokens = torch.randn(2, NUM_TOKENS, T)
    with torch.no_grad():
        want = reference_adapter(_dit_and_adapter(src)[1], tokens)
        torch.testing.assert_close(decoder.adapter(tokens), want)


def test_infer_config_and_legacy_layout() -> None:
    for legacy in (False, True):
        src = source_state(legacy=legacy)
        config = infer_config(src, num_tokens=NUM_TOKENS, image_size=IMAGE, axes_dims_rope=AXES)
        want = small_config()
        for field in ("token_dim", "patch_size", "num_layers", "num_single_layers", "num_attention_heads",
                      "attention_head_dim", "joint_attention_dim", "adapter_hidden", "pooled_projection_dim",
                      "guidance_embeds", "latent"):  # fmt: skip
            assert getattr(config, field) == getattr(want, field), field
        state = convert_nexus_gen_state_dict(src, config)
        assert set(state) == set(OrionDecoder(config).trainable_state_dict())
    assert not infer_config(source_state(guidance=False), num_tokens=NUM_TOKENS, image_size=IMAGE,
                            axes_dims_rope=AXES).guidance_embeds  # fmt: skip
    with pytest.raises(ValueError, match="axes_dims_rope"):
        infer_config(source_state(), num_tokens=NUM_TOKENS, image_size=IMAGE)


def test_pooled_is_the_constant_and_split_is_exact() -> None:
    config = small_config()
    src = source_state()
    pooled = torch.randn(P)
    state = convert_nexus_gen_state_dict(src, config, pooled_embedding=pooled)
    assert torch.equal(state["pooled.weight"], torch.zeros(P, J))
    assert torch.equal(state["pooled.bias"], pooled)
    qkv = src["pipe.dit.blocks.0.attn.a_to_qkv.weight"]
    assert torch.equal(state["transformer.transformer_blocks.0.attn.to_k.weight"], qkv[D : 2 * D])
    fused = src["pipe.dit.single_blocks.0.to_qkv_mlp.bias"]
    assert torch.equal(state["transformer.single_transformer_blocks.0.proj_mlp.bias"], fused[3 * D :])
    with pytest.raises(ValueError, match="pooled embedding has"):
        convert_nexus_gen_state_dict(src, config, pooled_embedding=torch.zeros(P + 1))


def test_unknown_and_missing_keys_are_named() -> None:
    config = small_config()
    src = source_state()
    src["pipe.dit.blocks.0.attn.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown source keys.*blocks\.0\.attn\.lora_A\.weight"):
        convert_nexus_gen_state_dict(src, config)
    src = source_state()
    del src["pipe.dit.single_blocks.0.to_qkv_mlp.weight"]
    with pytest.raises(ValueError, match=r"missing source keys \['single_blocks\.0\.to_qkv_mlp\.weight'\]"):
        convert_nexus_gen_state_dict(src, config)
    src = source_state()
    del src["adapter.4.bias"]
    with pytest.raises(ValueError, match=r"missing source keys \['adapter\.4\.bias'\]"):
        convert_nexus_gen_state_dict(src, config)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_nexus_gen_state_dict(source_state(), small_config().__class__(**{
            **small_config().to_dict(), "axes_dims_rope": AXES, "adapter_hidden": A + 2}))  # fmt: skip


def test_convert_files_and_round_trip(tmp_path) -> None:
    src = source_state()
    image, tokens, sigma, pooled = _inputs(3)
    kw = dict(num_tokens=NUM_TOKENS, image_size=IMAGE, axes_dims_rope=AXES)
    # one .safetensors file; a directory of shards; a torch .bin
    one = tmp_path / "decoder.safetensors"
    save_file(src, one)
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(src)
    save_file({k: src[k] for k in keys[::2]}, shards / "model-00001.safetensors")
    save_file({k: src[k] for k in keys[1::2]}, shards / "model-00002.safetensors")
    binfile = tmp_path / "epoch=0.bin"
    torch.save(src, binfile)
    pooled_file = tmp_path / "pooled.safetensors"
    save_file({"pooled": pooled}, pooled_file)
    for path in (shards, binfile):
        assert set(load_checkpoint(path)) == set(src)

    out = convert_nexus_gen_decoder(one, tmp_path / "out", pooled_embedding=pooled_file, **kw)
    loaded = OrionDecoder.from_pretrained(out).eval()
    assert loaded.config.extra["adapter_act"] == "relu"
    reference = _converted(loaded.config, src, pooled)
    ids = torch.zeros(NUM_TOKENS, 3)
    with torch.no_grad():
        a = loaded(loaded.pack(image), sigma, loaded.adapter(tokens), ids)
        b = reference(reference.pack(image), sigma, reference.adapter(tokens), ids)
    assert torch.equal(a, b)
    out2 = convert_nexus_gen_decoder(binfile, tmp_path / "out2", pooled_embedding=pooled, **kw)
    assert torch.equal(OrionDecoder.from_pretrained(out2).pooled.bias, pooled)


def test_convert_errors_name_the_file(tmp_path) -> None:
    src = source_state()
    path = tmp_path / "nexus.safetensors"
    save_file(src, path)
    kw = dict(num_tokens=NUM_TOKENS, image_size=IMAGE, axes_dims_rope=AXES)
    with pytest.raises(ValueError, match=r"nexus\.safetensors.*empty prompt"):
        convert_nexus_gen_decoder(path, tmp_path / "o", **kw)
    src["pipe.dit.mystery.weight"] = torch.zeros(2)
    save_file(src, path)
    with pytest.raises(ValueError, match=r"nexus\.safetensors.*mystery\.weight"):
        convert_nexus_gen_decoder(path, tmp_path / "o", pooled_embedding=torch.zeros(P), **kw)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.safetensors"):
        convert_nexus_gen_decoder(bad, tmp_path / "o", pooled_embedding=torch.zeros(P), **kw)
    with pytest.raises(FileNotFoundError, match="nope"):
        convert_nexus_gen_decoder(tmp_path / "nope", tmp_path / "o")
