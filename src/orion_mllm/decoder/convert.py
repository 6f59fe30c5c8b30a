"""Convert Nexus-Gen's generation decoder (DiffSynth-Studio ``FluxDiT`` + token adapter) to ``OrionDecoder``.

Source layout (what Nexus-Gen's ``GenerationDecoder.on_save_checkpoint`` writes, mi804/Nexus-Gen
``train/decoder/generation_trainer.py``; loaded by ``modeling/decoder/generation_decoder.py``):

* ``pipe.dit.<FluxDiT key>`` -- DiffSynth-Studio ``diffsynth/models/flux_dit.py`` naming, fused
  ``a_to_qkv`` / ``b_to_qkv`` (q, k, v stacked on the output dim) and, in single blocks, ``to_qkv_mlp``
  (q, k, v, then the 4x MLP input, stacked the same way). The older ``modeling/decoder/flux_decoder.py``
  checkpoints carry the DiT keys with no prefix; ``dit.`` is accepted too.
* ``adapter.{0,1,3,4}.{weight,bias}`` -- ``nn.Sequential(Linear(3584, 4096), LayerNorm(4096), ReLU(),
  Linear(4096, 4096), LayerNorm(4096))`` (older checkpoints: the same keys without ``adapter.``).

Modulation order needs no reordering: DiffSynth's ``AdaLayerNorm`` (shift, scale, gate, shift, scale, gate),
``AdaLayerNormSingle`` (shift, scale, gate) and ``AdaLayerNormContinuous`` (scale, shift) already use
diffusers' order (DiffSynth's ``from_diffusers`` renames them 1:1; its ``from_civitai`` is where BFL's
(shift, scale) final modulation gets swapped).

What Nexus-Gen feeds the DiT besides the adapted tokens (``modeling/decoder/pipelines.py``):

* pooled projection: the CLIP-L pooled embedding of the empty prompt ``""`` (``encode_prompt("",
  clip_only=True)``), a constant. Ours computes ``pooled(cond.mean(1))``; the conversion sets
  ``pooled.weight = 0`` and ``pooled.bias = CLIP("")`` so it yields exactly that constant.
* text position ids: all zeros for the generation decoder. ``OrionDecoder.cond_ids`` is ``(1, row, col)``;
  to reproduce Nexus-Gen, pass ``torch.zeros(num_tokens, 3)`` as ``cond_ids`` (recorded in
  ``config.extra["cond_ids"] = "zeros"``).
* guidance: FLUX.1-dev's embedded guidance, 3.5 by default; ``cfg_scale`` defaults to 1.0 (no CFG). When
  CFG is used, the negative branch is the full T5-XXL + CLIP encoding of ``negative_prompt`` (512 T5
  tokens), which an 81-token ``null_tokens`` cannot represent; ``null_tokens`` is left at zeros.
* timestep: DiffSynth passes ``sigma * 1000`` and ``guidance * 1000`` to the sinusoidal embedders; diffusers
  multiplies ``t`` and ``guidance`` by 1000 itself, so ``OrionDecoder``'s ``t = sigma`` in [0, 1] matches
  (same flow convention: ``x_t = (1 - t) x_0 + t noise``, target ``noise - x_0``).

Not absorbable by a weight mapping: Nexus-Gen's adapter uses **ReLU**, ``TokenAdapter`` uses GELU. The
conversion records ``config.extra["adapter_act"] = "relu"``; ``TokenAdapter`` has to honour it for the
converted decoder to reproduce Nexus-Gen's adapter output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from orion_mllm.decoder.model import FLUX_DEV_VAE, DecoderConfig, OrionDecoder

__all__ = [
    "convert_nexus_gen_decoder",
    "convert_nexus_gen_state_dict",
    "empty_prompt_pooled_embedding",
    "infer_config",
    "load_checkpoint",
    "split_nexus_gen_state_dict",
]

DIT_PREFIXES = ("pipe.dit.", "dit.")
ADAPTER_PREFIX = "adapter."
# Nexus-Gen adapter Sequential index -> TokenAdapter submodule.
ADAPTER_MAP = {"0": "proj_in", "1": "norm_in", "3": "proj_out", "4": "norm_out"}
FLUX_DEV_AXES = (16, 56, 56)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")

# Unfused top-level DiffSynth modules -> diffusers FluxTransformer2DModel modules.
_GLOBAL = {
    "x_embedder": "x_embedder",
    "context_embedder": "context_embedder",
    "time_embedder.timestep_embedder.0": "time_text_embed.timestep_embedder.linear_1",
    "time_embedder.timestep_embedder.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_embedder.timestep_embedder.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_embedder.timestep_embedder.2": "time_text_embed.guidance_embedder.linear_2",
    "pooled_text_embedder.0": "time_text_embed.text_embedder.linear_1",
    "pooled_text_embedder.2": "time_text_embed.text_embedder.linear_2",
    "final_norm_out.linear": "norm_out.linear",
    "final_proj_out": "proj_out",
}
# Double ("joint") block: DiffSynth module -> diffusers module(s); a tuple means "split into these".
_DOUBLE: dict[str, str | tuple[str, ...]] = {
    "norm1_a.linear": "norm1.linear",
    "norm1_b.linear": "norm1_context.linear",
    "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.norm_q_a": "attn.norm_q",
    "attn.norm_k_a": "attn.norm_k",
    "attn.norm_q_b": "attn.norm_added_q",
    "attn.norm_k_b": "attn.norm_added_k",
    "attn.a_to_out": "attn.to_out.0",
    "attn.b_to_out": "attn.to_add_out",
    "ff_a.0": "ff.net.0.proj",
    "ff_a.2": "ff.net.2",
    "ff_b.0": "ff_context.net.0.proj",
    "ff_b.2": "ff_context.net.2",
}
_SINGLE: dict[str, str | tuple[str, ...]] = {
    "norm.linear": "norm.linear",
    "to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # sizes D, D, D, 4D
    "norm_q_a": "attn.norm_q",
    "norm_k_a": "attn.norm_k",
    "proj_out": "proj_out",
}
_BLOCK = re.compile(r"^(blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


# ---------------------------------------------------------------------------- source layout


def split_nexus_gen_state_dict(src: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(DiT keys without prefix, adapter keys as ``{0,1,3,4}.{weight,bias}``) of a Nexus-Gen checkpoint."""
    dit: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    bare_adapter = re.compile(r"^[0-4]\.(weight|bias)$")
    for key, value in src.items():
        if key.startswith(ADAPTER_PREFIX):
            adapter[key[len(ADAPTER_PREFIX) :]] = value
        elif bare_adapter.match(key):  # modeling/decoder/flux_decoder.py layout
            adapter[key] = value
        else:
            for prefix in DIT_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            dit[key] = value
    return dit, adapter


def _shape(d: dict[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in d:
        raise ValueError(f"nexus-gen decoder: cannot infer {what}: source key {key!r} is missing")
    return tuple(d[key].shape)


def infer_config(
    src: dict[str, torch.Tensor],
    *,
    num_tokens: int = 81,
    image_size: int = 512,
    latent: str | None = None,
    patch_size: int | None = None,
    axes_dims_rope: tuple[int, int, int] | None = None,
) -> DecoderConfig:
    """``DecoderConfig`` from a Nexus-Gen state dict's shapes.

    Widths, depths, head size and the guidance embedder come from the weights. What the weights do not
    say: the token grid (Nexus-Gen: 81 tokens), the output size (Nexus-Gen decodes at 512 by default),
    the RoPE axis split (FLUX.1-dev's (16, 56, 56) when the head size is 128) and the latent space
    (64 input channels = FLUX.1-dev's 16-channel VAE with 2x2 patches; otherwise pixels, 3 p^2 channels).
    """
    dit, adapter = split_nexus_gen_state_dict(src)
    inner, in_channels = _shape(dit, "x_embedder.weight", "the transformer width")
    _, joint = _shape(dit, "context_embedder.weight", "joint_attention_dim")
    _, pooled_dim = _shape(dit, "pooled_text_embedder.0.weight", "pooled_projection_dim")
    adapter_hidden, token_dim = _shape(adapter, "0.weight", "the adapter input width")
    head_dim = _shape(dit, "blocks.0.attn.norm_q_a.weight", "attention_head_dim")[0]
    if inner % head_dim:
        raise ValueError(f"nexus-gen decoder: width {inner} is not a multiple of head size {head_dim}")
    num_layers = len({int(m.group(2)) for k in dit if (m := _BLOCK.match(k)) and m.group(1) == "blocks"})
    num_single = len(
        {int(m.group(2)) for k in dit if (m := _BLOCK.match(k)) and m.group(1) == "single_blocks"}
    )
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(
                f"nexus-gen decoder: head size {head_dim} is not FLUX's 128; pass axes_dims_rope explicitly"
            )
        axes_dims_rope = FLUX_DEV_AXES
    if latent is None:
        latent = "vae" if in_channels == FLUX_DEV_VAE["latent_channels"] * 4 else "pixel"
    channels = FLUX_DEV_VAE["latent_channels"] if latent == "vae" else 3
    if patch_size is None:
        patch_size = round((in_channels / channels) ** 0.5)
    if channels * patch_size**2 != in_channels:
        raise ValueError(
            f"nexus-gen decoder: x_embedder takes {in_channels} channels, not {channels} x {patch_size}^2 "
            f"({latent} latents)"
        )
    return DecoderConfig(
        token_dim=token_dim, num_tokens=num_tokens, image_size=image_size, latent=latent,
        patch_size=patch_size, num_layers=num_layers, num_single_layers=num_single,
        num_attention_heads=inner // head_dim, attention_head_dim=head_dim, joint_attention_dim=joint,
        adapter_hidden=adapter_hidden, pooled_projection_dim=pooled_dim, axes_dims_rope=tuple(axes_dims_rope),
        guidance_embeds="guidance_embedder.timestep_embedder.0.weight" in dit,
        vae=dict(FLUX_DEV_VAE) if latent == "vae" else None, preset="nexus-gen",
        extra={"source": "nexus-gen", "adapter_act": "relu", "cond_ids": "zeros"},
    )  # fmt: skip


# ---------------------------------------------------------------------------- mapping


def _split(name: str, value: torch.Tensor, targets: tuple[str, ...], inner: int) -> dict[str, torch.Tensor]:
    sizes = [inner] * 3 + ([value.shape[0] - 3 * inner] if len(targets) == 4 else [])
    if sum(sizes) != value.shape[0] or min(sizes) <= 0:
        raise ValueError(f"nexus-gen decoder: {name} has {value.shape[0]} rows, cannot split as {sizes}")
    return dict(zip(targets, torch.split(value, sizes, dim=0), strict=True))


def convert_nexus_gen_state_dict(
    src: dict[str, torch.Tensor],
    config: DecoderConfig,
    *,
    pooled_embedding: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Nexus-Gen decoder state dict -> ``OrionDecoder.state_dict()`` keys (VAE excluded).

    ``pooled_embedding`` is the constant Nexus-Gen feeds as the pooled projection (CLIP-L pooled output of
    the empty prompt, ``[pooled_projection_dim]``); it becomes ``pooled.bias`` with ``pooled.weight = 0``.
    ``None`` leaves a zero vector there (only right if that is what the source used).
    Raises ``ValueError`` listing unknown and missing source keys, or shape mismatches.
    """
    c = config
    inner = c.num_attention_heads * c.attention_head_dim
    dit, adapter = split_nexus_gen_state_dict(src)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []

    for key, value in adapter.items():
        idx, _, param = key.partition(".")
        if idx in ADAPTER_MAP and param in ("weight", "bias"):
            out[f"adapter.{ADAPTER_MAP[idx]}.{param}"] = value
        else:
            unknown.append(ADAPTER_PREFIX + key)

    for key, value in dit.items():
        module, _, param = key.rpartition(".")
        if module in _GLOBAL and param in ("weight", "bias"):
            out[f"transformer.{_GLOBAL[module]}.{param}"] = value
            continue
        m = _BLOCK.match(key)
        table = {"blocks": _DOUBLE, "single_blocks": _SINGLE}.get(m.group(1)) if m else None
        target = table.get(m.group(3)) if table else None
        if target is None:
            unknown.append(key)
            continue
        ours = "transformer_blocks" if m.group(1) == "blocks" else "single_transformer_blocks"
        base = f"transformer.{ours}.{m.group(2)}."
        if isinstance(target, tuple):
            for name, part in _split(key, value, target, inner).items():
                out[f"{base}{name}.{m.group(4)}"] = part.contiguous()
        else:
            out[f"{base}{target}.{m.group(4)}"] = value

    expected = _expected_shapes(c)
    missing = sorted(
        k for k in expected if k not in out and k not in ("pooled.weight", "pooled.bias", "null_tokens")
    )
    extra = sorted(k for k in out if k not in expected)
    if unknown or missing or extra:
        parts = []
        if unknown:
            parts.append(f"unknown source keys {sorted(unknown)}")
        if missing:
            sources = sorted({_source_name(k) for k in missing})
            parts.append(f"missing source keys {sources} (for {missing})")
        if extra:
            parts.append(f"keys outside a {c.num_layers}+{c.num_single_layers}-block decoder {extra}")
        raise ValueError("nexus-gen decoder: " + "; ".join(parts))
    bad = [
        f"{k}: {tuple(out[k].shape)} vs {tuple(expected[k].shape)}"
        for k in out
        if tuple(out[k].shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise ValueError(f"nexus-gen decoder: shape mismatches {bad}")

    dtype = out["transformer.x_embedder.weight"].dtype
    out["pooled.weight"] = torch.zeros(c.pooled_projection_dim, c.joint_attention_dim, dtype=dtype)
    if pooled_embedding is None:
        pooled_embedding = torch.zeros(c.pooled_projection_dim)
    pooled_embedding = pooled_embedding.detach().reshape(-1).to(dtype)
    if pooled_embedding.numel() != c.pooled_projection_dim:
        raise ValueError(
            f"nexus-gen decoder: pooled embedding has {pooled_embedding.numel()} values, expected "
            f"{c.pooled_projection_dim}"
        )
    out["pooled.bias"] = pooled_embedding
    # Nexus-Gen has no learned unconditional sequence (its CFG negative is the T5/CLIP encoding of a
    # negative prompt, and cfg_scale defaults to 1); zeros keep the key present.
    out["null_tokens"] = torch.zeros(c.num_tokens, c.joint_attention_dim, dtype=dtype)
    return out


def _source_name(ours: str) -> str:
    """The Nexus-Gen key (DiT keys without ``pipe.dit.``) that feeds one of our keys."""
    module, _, param = ours.rpartition(".")
    if module.startswith("adapter."):
        inverse = {v: k for k, v in ADAPTER_MAP.items()}
        return f"adapter.{inverse[module.split('.', 1)[1]]}.{param}"
    module = module.removeprefix("transformer.")
    for src, dst in _GLOBAL.items():
        if module == dst:
            return f"{src}.{param}"
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
    if m:
        kind, table = (
            ("blocks", _DOUBLE) if m.group(1) == "transformer_blocks" else ("single_blocks", _SINGLE)
        )
        for src, dst in table.items():
            if m.group(3) == dst or (isinstance(dst, tuple) and m.group(3) in dst):
                return f"{kind}.{m.group(2)}.{src}.{param}"
    return ours


def _expected_shapes(c: DecoderConfig) -> dict[str, torch.Tensor]:
    """Target keys and shapes without allocating a real-scale model (meta tensors)."""
    with torch.device("meta"):
        model = OrionDecoder(c)
    return model.trainable_state_dict()


# ---------------------------------------------------------------------------- files


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # re-raised with the file named
        raise ValueError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    for wrapper in ("state_dict", "module"):
        if isinstance(state, dict) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a flat name -> tensor state dict")
    return dict(state)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file, or a directory of shards (``*.safetensors``, else ``*.bin``/``*.pth``/``*.pt``)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"{path}: unsupported checkpoint type (expected one of {CHECKPOINT_SUFFIXES})")
        return _load_one(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    files: list[Path] = []
    for suffix in CHECKPOINT_SUFFIXES:
        files = sorted(path.glob(f"*{suffix}"))
        if files:
            break
    if not files:
        raise ValueError(f"{path}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in this directory")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_one(f)
        dup = sorted(set(part) & set(state))
        if dup:
            raise ValueError(f"{f}: keys already in another shard: {dup[:5]}")
        state.update(part)
    return state


def empty_prompt_pooled_embedding(flux_path: str | Path) -> torch.Tensor:
    """CLIP-L pooled output for ``""`` from a FLUX.1-dev folder (``text_encoder/`` + ``tokenizer/``).

    Mirrors DiffSynth's ``encode_prompt_using_clip``: pad to 77 with ``padding="max_length"``, take the
    pooled (EOS) state, no projection.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    flux_path = Path(flux_path)
    for sub in ("text_encoder", "tokenizer"):
        if not (flux_path / sub).is_dir():
            raise FileNotFoundError(f"{flux_path / sub}: missing (expected a FLUX.1-dev folder)")
    tokenizer = CLIPTokenizer.from_pretrained(flux_path / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(flux_path / "text_encoder", local_files_only=True).float().eval()
    ids = tokenizer([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(input_ids=ids).pooler_output[0].float()


def _read_pooled(value: torch.Tensor | str | Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    state = load_checkpoint(value)
    if len(state) != 1:
        raise ValueError(
            f"{value}: expected exactly one tensor (the pooled embedding), found {sorted(state)}"
        )
    return next(iter(state.values()))


def convert_nexus_gen_decoder(
    src_path: str | Path,
    dst_path: str | Path,
    *,
    flux_path: str | Path | None = None,
    pooled_embedding: torch.Tensor | str | Path | None = None,
    config: DecoderConfig | None = None,
    **infer_kwargs: Any,
) -> Path:
    """Read a Nexus-Gen decoder checkpoint, convert it, load an ``OrionDecoder`` strictly, save it to ``dst``.

    ``flux_path`` (a FLUX.1-dev folder in diffusers layout, as Nexus-Gen's ``download_models.py`` fetches)
    supplies the VAE (``vae/``) and the empty-prompt CLIP pooled embedding; ``pooled_embedding`` (a tensor
    or a one-tensor file) overrides the latter. A VAE-latent decoder needs ``flux_path``: Nexus-Gen
    checkpoints hold no VAE weights.
    """
    src_path = Path(src_path)
    src = load_checkpoint(src_path)
    try:
        cfg = config or infer_config(src, **infer_kwargs)
        if pooled_embedding is not None:
            pooled = _read_pooled(pooled_embedding)
        elif flux_path is not None:
            pooled = empty_prompt_pooled_embedding(flux_path)
        else:
            raise ValueError(
                "Nexus-Gen feeds CLIP-L's pooled embedding of the empty prompt; pass flux_path (a FLUX.1-dev "
                "folder with text_encoder/ and tokenizer/) or pooled_embedding"
            )
        if cfg.latent == "vae" and flux_path is None:
            raise ValueError(
                "a VAE-latent decoder needs flux_path (FLUX.1-dev's vae/); the checkpoint has none"
            )
        state = convert_nexus_gen_state_dict(src, cfg, pooled_embedding=pooled)
    except ValueError as err:
        raise ValueError(f"{src_path}: {err}") from None
    decoder = OrionDecoder(cfg)
    if decoder.vae is not None:
        from diffusers import AutoencoderKL

        vae_dir = Path(flux_path) / "vae"
        if not vae_dir.is_dir():
            raise FileNotFoundError(f"{vae_dir}: missing (FLUX.1-dev VAE in diffusers layout)")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
        decoder.vae.load_state_dict(vae.state_dict(), strict=True)
        state.update({f"vae.{k}": v for k, v in decoder.vae.state_dict().items()})
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return decoder.save_pretrained(dst_path)
