"""The diffusion decoder: renders ORION's visual tokens to pixels (paper 3.1, Nexus-Gen style).

``OrionDecoder`` = ``TokenAdapter`` (visual tokens -> the transformer's conditioning width:
Linear -> LayerNorm -> GELU -> Linear -> LayerNorm) + a diffusers ``FluxTransformer2DModel`` that
denoises image patches while attending jointly to the adapted tokens (FLUX's "text" stream),
+ for the real-scale preset a FLUX.1-dev-like 16-channel ``AutoencoderKL``. The small presets work
in pixel space: the "latent" is the image itself in [-1, 1], patchified like FLUX packs latents.

Position ids (FLUX's 3-axis RoPE): image patches are ``(0, row, col)``; the target's visual tokens
``(1, row, col)`` on the *same* grid (token (i, j) of an n x n token grid sits at the centre of the
patches it covers), so each patch finds its token by position; the optional editing stream (the
source image's tokens, Nexus-Gen's editing decoder) gets ``(2, row, col)``.

Classifier-free guidance: during training the conditioning is replaced by a learned null sequence
with probability ``cond_dropout`` (``decoder/flow.py``); ``null_tokens`` is that sequence.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

DECODER_CONFIG = "decoder_config.json"
DECODER_WEIGHTS = "decoder.safetensors"
NETWORK_WEIGHTS = "network.safetensors"  # the weights but the coarse map (save_network)
# The coarse map's tensors (``coarse_rank`` > 0): fitted in closed form, never by the optimiser.
COARSE_KEYS = ("coarse_token_mean", "coarse_in.weight", "coarse_out.weight", "coarse_out.bias")
SAMPLE_PREDICTION_MIN_T = 0.05
MAX_COARSE_FEATURES = 16384


@dataclass(frozen=True)
class DecoderConfig:
    """Everything that defines a decoder's architecture (saved as ``decoder_config.json``)."""

    token_dim: int  # width of the visual tokens (the LLM hidden size)
    num_tokens: int  # visual tokens per image (a square grid)
    image_size: int  # output side in pixels
    latent: str = "pixel"  # "pixel" (small presets) or "vae" (FLUX.1-dev latents)
    patch_size: int = 4  # pixels (or latent cells) per patch side
    num_layers: int = 2  # double-stream (joint) blocks
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    joint_attention_dim: int = 128  # adapter output width
    adapter_hidden: int = 256
    pooled_projection_dim: int = 128
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    guidance_embeds: bool = False
    # What the transformer outputs: "velocity" (FLUX) or "sample" (the clean image, turned into a
    # velocity (x_t - x_0) / t; predicting the clean signal is far easier for large pixel patches).
    prediction: str = "velocity"
    # Channels of per-patch conditioning concatenated to each image patch: the features of the visual
    # token covering that patch (0 = off, as in Nexus-Gen/FLUX). Gives every patch its token without
    # having to find it by attention, which the small CPU-trained decoders learn far faster with.
    spatial_cond: int = 0
    # Rank of the coarse estimate (0 = off; pixel-space presets only): a linear map from all of an
    # image's tokens to its pixels, fitted in closed form (ridge regression, ``decoder/coarse.py``)
    # before diffusion training and then frozen. It is given to every patch as conditioning and, for
    # clean-sample prediction, the transformer predicts the residual on top of it, so training starts
    # from a blurry but correct layout and spends its steps on sharpening.
    coarse_rank: int = 0
    vae: dict[str, Any] | None = None  # AutoencoderKL config for latent == "vae"
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens:
            raise ValueError(f"decoder: num_tokens={self.num_tokens} is not a square grid")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"decoder: axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        if self.prediction not in ("velocity", "sample"):
            raise ValueError(f"decoder: prediction={self.prediction!r}, expected 'velocity' or 'sample'")
        if self.latent not in ("pixel", "vae"):
            raise ValueError(f"decoder: latent={self.latent!r}, expected 'pixel' or 'vae'")
        if self.coarse_rank and self.latent != "pixel":
            raise ValueError(
                "decoder: coarse_rank needs latent='pixel' (a linear map to VAE latents is not fitted)"
            )
        if self.coarse_rank and self.num_tokens * self.token_dim > MAX_COARSE_FEATURES:
            raise ValueError(
                f"decoder: coarse_rank needs num_tokens x token_dim <= {MAX_COARSE_FEATURES} (its ridge fit "
                f"solves a square system of that size), got {self.num_tokens} x {self.token_dim}"
            )
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"decoder: latent side {self.latent_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def latent_channels(self) -> int:
        return 3 if self.latent == "pixel" else int(self.vae["latent_channels"])

    @property
    def vae_scale(self) -> int:
        if self.latent == "pixel":
            return 1
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.latent_size // self.patch_size

    @property
    def in_channels(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def patch_cond_channels(self) -> int:
        """Per-patch conditioning channels concatenated to each noisy patch."""
        return self.spatial_cond + (self.in_channels if self.coarse_rank else 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = DECODER_CONFIG) -> DecoderConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        data = dict(data)
        if "axes_dims_rope" in data:
            data["axes_dims_rope"] = tuple(data["axes_dims_rope"])
        return cls(**data)


# FLUX.1-dev's VAE (diffusers' AutoencoderKL config of black-forest-labs/FLUX.1-dev/vae).
FLUX_DEV_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def decoder_preset(name: str, *, token_dim: int, num_tokens: int, image_size: int) -> DecoderConfig:
    """``micro`` / ``tiny`` (pixel space, CPU-sized) or ``flux-dev`` (FLUX.1-dev transformer + VAE)."""
    if name == "micro":
        return DecoderConfig(
            token_dim=token_dim, num_tokens=num_tokens, image_size=image_size, patch_size=4,
            num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
            joint_attention_dim=64, adapter_hidden=128, pooled_projection_dim=64, preset=name,
        )  # fmt: skip
    if name == "tiny":
        return DecoderConfig(
            token_dim=token_dim, num_tokens=num_tokens, image_size=image_size, patch_size=4,
            num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32,
            joint_attention_dim=128, adapter_hidden=256, pooled_projection_dim=128, preset=name,
        )  # fmt: skip
    if name == "flux-dev":
        return DecoderConfig(
            token_dim=token_dim, num_tokens=num_tokens, image_size=image_size, latent="vae",
            patch_size=2, num_layers=19, num_single_layers=38, num_attention_heads=24,
            attention_head_dim=128, joint_attention_dim=4096, adapter_hidden=4096,
            pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True,
            vae=dict(FLUX_DEV_VAE), preset=name,
        )  # fmt: skip
    raise ValueError(f"unknown decoder preset {name!r}; choose micro, tiny or flux-dev")


class TokenAdapter(nn.Module):
    """Visual tokens -> conditioning width (Nexus-Gen's adapter shape)."""

    def __init__(self, token_dim: int, hidden: int, out_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"adapter activation {activation!r}: expected 'gelu' or 'relu'")
        self.proj_in = nn.Linear(token_dim, hidden)
        self.norm_in = nn.LayerNorm(hidden)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()  # Nexus-Gen's adapter uses ReLU
        self.proj_out = nn.Linear(hidden, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.proj_out(self.act(self.norm_in(self.proj_in(tokens)))))


def _write_weights(state: dict[str, torch.Tensor], file: Path) -> Path:
    """``state`` as one safetensors file, written to a temporary name and renamed (never half-written)."""
    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
    tmp.replace(file)
    return file


def grid_ids(side: int, span: int, stream: int) -> torch.Tensor:
    """(stream, row, col) ids for a side x side grid spread over ``span`` x ``span`` patch positions."""
    step = span / side
    centre = (torch.arange(side, dtype=torch.float32) + 0.5) * step - 0.5
    rows, cols = torch.meshgrid(centre, centre, indexing="ij")
    ids = torch.stack([torch.full_like(rows, float(stream)), rows, cols], dim=-1)
    return ids.reshape(side * side, 3)


class OrionDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.adapter = TokenAdapter(
            c.token_dim, c.adapter_hidden, c.joint_attention_dim, c.extra.get("adapter_act", "gelu")
        )
        self.pooled = nn.Linear(c.joint_attention_dim, c.pooled_projection_dim)
        # The CFG "unconditional" input: a learned sequence in place of the adapted tokens.
        self.null_tokens = nn.Parameter(torch.zeros(c.num_tokens, c.joint_attention_dim))
        self.spatial = nn.Linear(c.token_dim, c.spatial_cond) if c.spatial_cond else None
        if c.coarse_rank:
            numel = c.latent_channels * c.latent_size**2
            # Fitted by decoder/coarse.py, never by the optimiser. Before fitting: the zero map.
            self.register_buffer("coarse_token_mean", torch.zeros(c.num_tokens * c.token_dim))
            self.coarse_in = nn.Linear(c.num_tokens * c.token_dim, c.coarse_rank, bias=False)
            self.coarse_out = nn.Linear(c.coarse_rank, numel)
            for lin in (self.coarse_in, self.coarse_out):
                nn.init.zeros_(lin.weight)
                lin.requires_grad_(False)
            nn.init.zeros_(self.coarse_out.bias)
        else:
            self.coarse_in = self.coarse_out = None
        self.transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=c.in_channels + c.patch_cond_channels,
            out_channels=c.in_channels,
            num_layers=c.num_layers,
            num_single_layers=c.num_single_layers,
            attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads,
            joint_attention_dim=c.joint_attention_dim,
            pooled_projection_dim=c.pooled_projection_dim,
            guidance_embeds=c.guidance_embeds,
            axes_dims_rope=c.axes_dims_rope,
        )
        self.vae = AutoencoderKL(**c.vae) if c.latent == "vae" else None
        if self.vae is not None:
            self.vae.requires_grad_(False)
        side = math.isqrt(c.num_tokens)
        self.register_buffer("img_ids", grid_ids(c.grid, c.grid, 0), persistent=False)
        # Converted Nexus-Gen decoders were trained with all-zero token ids (FLUX's text convention).
        zero_ids = c.extra.get("cond_ids") == "zeros"
        cond_ids = torch.zeros(c.num_tokens, 3) if zero_ids else grid_ids(side, c.grid, 1)
        self.register_buffer("cond_ids", cond_ids, persistent=False)
        self.register_buffer("edit_ids", grid_ids(side, c.grid, 2), persistent=False)
        # Which token covers each patch (row-major token grid over the row-major patch grid).
        cover = torch.arange(c.grid) * side // c.grid
        self.register_buffer(
            "patch_token", (cover.view(-1, 1) * side + cover.view(1, -1)).reshape(-1), persistent=False
        )

    # ------------------------------------------------------------------ latents

    def check_tokens(self, tokens: torch.Tensor, what: str = "tokens") -> None:
        c = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != (c.num_tokens, c.token_dim):
            raise ValueError(
                f"{what}: expected shape [batch, {c.num_tokens}, {c.token_dim}] (this decoder's tokens per "
                f"image and token width), got {list(tokens.shape)}"
            )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> latents [B, C, h, w] (pixel space: scaled to [-1, 1])."""
        x = pixels * 2 - 1
        if self.vae is None:
            return x
        cfg = self.vae.config
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        return (latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, 3, H, W] pixels in [0, 1]."""
        if self.vae is not None:
            cfg = self.vae.config
            latents = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            latents = self.vae.decode(latents.to(self.vae.dtype)).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, (h/p)(w/p), C p p] (FLUX's 2x2 packing, generalised to p)."""
        b, ch, h, w = latents.shape
        p = self.config.patch_size
        x = latents.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), ch * p * p)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = packed.shape[0]
        g, p, ch = c.grid, c.patch_size, c.latent_channels
        x = packed.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, ch, g * p, g * p)

    # ------------------------------------------------------------------ network

    def condition(
        self,
        tokens: torch.Tensor | None,
        edit_tokens: torch.Tensor | None = None,
        *,
        batch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapted conditioning sequence and its position ids; ``tokens=None`` is the null condition."""
        if tokens is None:
            cond = self.null_tokens.unsqueeze(0).expand(batch, -1, -1)
        else:
            self.check_tokens(tokens)
            cond = self.adapter(tokens)
        ids = self.cond_ids
        if edit_tokens is not None:
            self.check_tokens(edit_tokens, "edit_tokens")
            cond = torch.cat([cond, self.adapter(edit_tokens)], dim=1)
            ids = torch.cat([ids, self.edit_ids], dim=0)
        return cond, ids

    def coarse_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """The fitted linear estimate [B, C, h, w] of the images of ``tokens`` [B, N, d]."""
        c = self.config
        if self.coarse_out is None:
            raise ValueError("this decoder has no coarse estimate (coarse_rank=0)")
        x = tokens.reshape(tokens.shape[0], -1) - self.coarse_token_mean.to(tokens.dtype)
        flat = self.coarse_out(self.coarse_in(x))
        return flat.reshape(-1, c.latent_channels, c.latent_size, c.latent_size)

    def spatial_condition(
        self, tokens: torch.Tensor | None, batch: int, *, null: bool = False
    ) -> torch.Tensor | None:
        """Per-patch conditioning [B, patches, patch_cond_channels]: the covering token's features
        (zeros for the null condition), then the patch of the coarse estimate; None when both are off.

        The null condition (``null=True`` or ``tokens=None``) keeps the coarse estimate, so classifier-free
        guidance amplifies only what the network adds to it (guiding the coarse image itself would
        push its colours past saturation); a decoder with a coarse estimate therefore needs the tokens
        for its null condition too."""
        c = self.config
        if self.coarse_out is not None and tokens is None:
            raise ValueError("this decoder's null condition keeps the coarse estimate: pass the tokens")
        parts = []
        if self.spatial is not None:
            if tokens is None or null:
                parts.append(self.null_tokens.new_zeros(batch, c.grid**2, c.spatial_cond))
            else:
                parts.append(self.spatial(tokens)[:, self.patch_token])
        if self.coarse_out is not None:
            parts.append(self.pack(self.coarse_latents(tokens)))
        return torch.cat(parts, dim=-1) if parts else None

    def forward(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        cond_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction for packed noisy latents [B, N, C p p] at flow time ``t`` in [0, 1]."""
        if self.config.patch_cond_channels:
            if spatial is None:
                raise ValueError("this decoder also conditions each patch (spatial_condition): pass spatial=")
            noisy_in = torch.cat([noisy, spatial.to(noisy.dtype)], dim=-1)
        else:
            noisy_in = noisy
        pooled = self.pooled(cond.mean(dim=1))
        if self.config.guidance_embeds and guidance is None:
            guidance = torch.full_like(t, 3.5)
        out = self.transformer(
            hidden_states=noisy_in,
            encoder_hidden_states=cond,
            pooled_projections=pooled,
            timestep=t,
            img_ids=self.img_ids,
            txt_ids=cond_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        if self.config.prediction == "sample":
            # x_t = (1 - t) x_0 + t noise  =>  v = noise - x_0 = (x_t - x_0) / t; t floored so the
            # division stays tame near the clean end.
            tt = t.clamp(min=SAMPLE_PREDICTION_MIN_T).view(-1, 1, 1).to(out.dtype)
            if self.coarse_out is not None:  # the network predicts the residual over the coarse image
                out = out + spatial[..., self.config.spatial_cond :].to(out.dtype)
            out = (noisy - out) / tt
        return out

    # ------------------------------------------------------------------ persistence

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vae.")}

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the optimiser trains: everything but the coarse map (``COARSE_KEYS``), which is a
        closed-form function of the tokens and images it is fitted on (``decoder/coarse.py``)."""
        return {k: v for k, v in self.trainable_state_dict().items() if k not in COARSE_KEYS}

    def save_network(self, path: str | Path) -> Path:
        """``network_state_dict`` as one safetensors file (what a committed decoder keeps in git)."""
        return _write_weights(self.network_state_dict(), Path(path))

    def load_network(self, path: str | Path) -> None:
        """Load weights written by :meth:`save_network` (the coarse map is left as it is: fit it after);
        a file holding other keys or missing some is refused, naming them."""
        file = Path(path)
        state = load_file(file)
        wanted = set(self.network_state_dict())
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or unexpected:
            raise ValueError(f"{file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, path: str | Path) -> Path:
        """``decoder_config.json`` + ``decoder.safetensors`` (+ ``vae/`` in diffusers format)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _write_weights(self.trainable_state_dict(), path / DECODER_WEIGHTS)
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        (path / DECODER_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> OrionDecoder:
        path = Path(path)
        cfg_file = path / DECODER_CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a decoder directory ({DECODER_CONFIG} missing)")
        try:
            config = DecoderConfig.from_dict(json.loads(cfg_file.read_text()), where=str(cfg_file))
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_file}: not valid JSON ({err})") from None
        model = cls(config)
        missing, unexpected = model.load_state_dict(load_file(path / DECODER_WEIGHTS), strict=False)
        missing = [k for k in missing if not k.startswith("vae.")]
        if missing or unexpected:
            raise ValueError(f"{path / DECODER_WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if model.vae is not None:
            vae_dir = path / "vae"
            if vae_dir.is_dir():
                model.vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
                model.vae.requires_grad_(False)
        return model.to(dtype)
