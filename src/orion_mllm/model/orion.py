"""The ORION model: a Qwen2.5-VL backbone, a vision head, and the three-loss training forward.

``OrionModel`` owns
- ``backbone``: transformers' ``Qwen2_5_VLForConditionalGeneration`` (vision tower + merger frozen:
  its outputs are both the teacher-forced inputs and the regression targets, so they must not move);
- ``vision_head``: regresses the next visual token from the final hidden state (``heads.py``);
- ``processor``: the Qwen2.5-VL processor (tokenizer, image processor, chat template);
- ``source_skip`` (optional, ``OrionConfig.source_skip``; ``model/source_skip.py``): an edit's
  source token at grid cell j added to the input that regresses the edited image's token j and,
  gated, to its prediction, so an edit sees the picture it changes cell by cell;
- ``config``: an ``OrionConfig`` saved as ``orion_config.json`` next to the backbone.

The forward computes, from one pass of the LLM over a teacher-forced batch, the unweighted terms:
CE at text targets, MSE at visual positions, and KL(teacher || student) at the visual positions
against the frozen base model (a ``KLTeacher``, ``model/teacher.py``) run on the same inputs, with
how many targets each averages over. Logits are only ever formed for the gathered positions, chunk
by chunk (``orion_mllm.losses``); weighting the terms into the step's loss is ``losses.step_loss``.

Model code is single-device; parallelism is applied from outside (training engine).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from orion_mllm.config import get_preset
from orion_mllm.images import ImageSpec
from orion_mllm.losses import (
    LossTerms,
    LossWeights,
    cross_entropy_loss,
    kl_divergence_loss,
    mse_loss,
    response_weights,
)
from orion_mllm.model.backbone import (
    build_backbone,
    encode_images,
    load_backbone,
    save_processor,
)
from orion_mllm.model.heads import HeadConfig, VisionHead, build_vision_head
from orion_mllm.model.source_skip import SourceSkip
from orion_mllm.sequence import IGNORE_INDEX, Batch, SequenceBuilder

ORION_CONFIG_NAME = "orion_config.json"
HEAD_WEIGHTS_NAME = "vision_head.safetensors"
SOURCE_SKIP_WEIGHTS_NAME = "source_skip.safetensors"
FORMAT_VERSION = 1


@dataclass
class OrionConfig:
    """What makes an ORION checkpoint more than a Qwen2.5-VL checkpoint."""

    head: HeadConfig
    image_spec: ImageSpec
    preset: str | None = None  # the architecture preset it was built from, if any
    base_model: str | None = None  # where the backbone came from (preset name or directory)
    # Default token-space classifier-free guidance of image generation (1: none); a model trained
    # with caption dropout records the weight chosen for it (recipe ``guidance``).
    guidance: float = 1.0
    # An edit's source token at cell j is added (through a learned linear map) to the input that
    # regresses the edited image's token j, and (gated) to its prediction (model/source_skip.py);
    # off: the paper's model.
    source_skip: bool = False
    # Understanding questions were trained with the picture after the first question (ShapesWorld's
    # ``shapes_data.question_first``): ``OrionPipeline.ask`` and ``orion eval shapes-und`` ask that way.
    question_first: bool = False
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "preset": self.preset,
            "base_model": self.base_model,
            "head": self.head.to_dict(),
            "image_spec": self.image_spec.to_dict(),
            "guidance": self.guidance,
            "source_skip": self.source_skip,
            "question_first": self.question_first,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = ORION_CONFIG_NAME) -> OrionConfig:
        known = {"format_version", "preset", "base_model", "head", "image_spec", "guidance", "source_skip",
                 "question_first"}  # fmt: skip
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("head", "image_spec"):
            if key not in data:
                raise ValueError(f"{where}: missing key {key!r}")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {version} is newer than this orion-mllm ({FORMAT_VERSION})"
            )
        return cls(
            head=HeadConfig.from_dict(data["head"]),
            image_spec=ImageSpec.from_dict(data["image_spec"]),
            preset=data.get("preset"),
            base_model=data.get("base_model"),
            guidance=float(data.get("guidance", 1.0)),
            source_skip=bool(data.get("source_skip", False)),
            question_first=bool(data.get("question_first", False)),
            format_version=version,
        )


@dataclass
class OrionOutput:
    """The unweighted loss terms of one forward and the number of targets each averages over."""

    terms: LossTerms
    num_text_targets: int = 0
    num_visual_targets: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def image_spec_from_processor(processor) -> ImageSpec:
    """Default resolutions for a plain Qwen2.5-VL directory: the paper's 252 px generation grid."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    return ImageSpec(
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
        gen_image_size=9 * factor,  # 252 px at patch 14 -> 9x9 = 81 visual tokens
        und_min_long_side=2 * factor,  # 56
        und_max_long_side=1024 // factor * factor,  # 1008: the largest multiple of 28 under 1024
    )


def backbone_hidden_states(
    backbone: Qwen2_5_VLForConditionalGeneration,
    batch: Batch,
    visual_tokens: torch.Tensor | None,
    *,
    all_layers: bool = False,
    source_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Final hidden states [B, S, d] (and every layer's, if asked) for a teacher-forced batch.

    Visual tokens are written at the ``<|image_pad|>`` positions, exactly as Qwen2.5-VL's own
    forward does with its vision features, so understanding goes through the same numbers.
    ``source_inputs`` [K, d] (``SourceSkip.inputs``) is added to the input embeddings at
    ``batch.visual_positions``.
    """
    lm = backbone.model.language_model
    embeds = lm.embed_tokens(batch.input_ids)
    if visual_tokens is not None:
        mask = (batch.input_ids == backbone.config.image_token_id).unsqueeze(-1)
        if int(mask.sum()) != visual_tokens.shape[0]:
            raise ValueError(
                f"batch has {int(mask.sum())} <|image_pad|> tokens but {visual_tokens.shape[0]} visual tokens"
            )
        embeds = embeds.masked_scatter(mask, visual_tokens.to(embeds.dtype))
    if source_inputs is not None:
        rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
        embeds = embeds.index_put((rows, cols), source_inputs.to(embeds.dtype), accumulate=True)
    # A batch without padding needs no mask: the text row of position_ids already tells
    # transformers where each sample starts (it builds the causal / packed mask from it).
    # A packed batch never gets one: its mask only marks padding, which forms its own segment.
    attention_mask = None if batch.packed or bool(batch.attention_mask.all()) else batch.attention_mask
    out = lm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        output_hidden_states=all_layers,
    )
    return out.last_hidden_state, (tuple(out.hidden_states) if all_layers else None)


class OrionModel(nn.Module):
    """Qwen2.5-VL + vision head, with ORION's losses."""

    def __init__(
        self,
        backbone: Qwen2_5_VLForConditionalGeneration,
        vision_head: VisionHead,
        processor,
        config: OrionConfig,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.vision_head = vision_head
        self.processor = processor
        self.config = config
        self.source_skip: SourceSkip | None = None
        if config.source_skip:
            self.enable_source_skip()
        self.set_vision_tower_trainable(False)

    def enable_source_skip(self) -> None:
        """Add the edit-source skip (``OrionConfig.source_skip``; ``model/source_skip.py``): input map at
        zero, output gate at one. A model that has one keeps it."""
        if self.source_skip is not None:
            return
        ref = self.backbone.lm_head.weight
        self.source_skip = SourceSkip(self.hidden_size, device=ref.device, dtype=ref.dtype)
        self.config.source_skip = True

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        head: str = "mlp",
        mlp_ratio: int = 8,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
    ) -> OrionModel:
        """Random-init model of a named architecture (``micro``, ``tiny``, ``qwen2.5-vl-3b/7b``)."""
        preset = get_preset(name)
        backbone, processor = build_backbone(
            preset, attn_implementation=attn_implementation, seed=seed, dtype=dtype
        )
        config = OrionConfig(
            head=_head_config(backbone, head, mlp_ratio),
            image_spec=preset.image_spec,
            preset=name,
            base_model=f"preset:{name}",
        )
        torch.manual_seed(seed + 1)
        vision_head = build_vision_head(config.head).to(dtype)
        return cls(backbone, vision_head, processor, config)

    @classmethod
    def from_qwen(
        cls,
        path: str | Path,
        *,
        head: str = "mlp",
        mlp_ratio: int = 8,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        image_spec: ImageSpec | None = None,
    ) -> OrionModel:
        """Wrap a local Qwen2.5-VL Hugging Face directory with a freshly initialised vision head."""
        backbone, processor = load_backbone(path, attn_implementation=attn_implementation, dtype=dtype)
        config = OrionConfig(
            head=_head_config(backbone, head, mlp_ratio),
            image_spec=image_spec or image_spec_from_processor(processor),
            base_model=str(path),
        )
        torch.manual_seed(seed)
        vision_head = build_vision_head(config.head).to(dtype)
        return cls(backbone, vision_head, processor, config)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
    ) -> OrionModel:
        """Load a directory written by ``save_pretrained``."""
        path = Path(path)
        _recover_interrupted_save(path)
        config_file = path / ORION_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path} is not an ORION model directory ({ORION_CONFIG_NAME} missing); "
                "use OrionModel.from_qwen for a plain Qwen2.5-VL directory"
            )
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from err
        config = OrionConfig.from_dict(raw, where=str(config_file))
        backbone, processor = load_backbone(path, attn_implementation=attn_implementation, dtype=dtype)
        vision_head = build_vision_head(config.head)
        state = load_file(path / HEAD_WEIGHTS_NAME)
        vision_head.load_state_dict(state, strict=True)
        model = cls(backbone, vision_head.to(dtype), processor, config)
        if model.source_skip is not None:
            skip_file = path / SOURCE_SKIP_WEIGHTS_NAME
            if not skip_file.is_file():
                raise FileNotFoundError(f"{config_file} says source_skip but {skip_file} is missing")
            model.source_skip.load_state_dict(load_file(skip_file), strict=True)
            model.source_skip.to(dtype)
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write backbone (HF format), processor, head weights and ``orion_config.json`` (safetensors only).

        Written to a temporary sibling directory first and swapped in at the end, so an interrupted
        save never leaves a half-written model where a good one was. An existing *ORION model*
        directory is replaced; any other non-empty directory is refused (never deleted).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not (path / ORION_CONFIG_NAME).is_file():
            raise FileExistsError(
                f"{path} is a non-empty directory that is not an ORION model; refusing to overwrite it "
                "(choose a new or empty folder)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # interrupted saves: never complete
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        self.backbone.save_pretrained(tmp, safe_serialization=True)
        save_processor(self.processor, tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in self.vision_head.state_dict().items()}
        save_file(state, tmp / HEAD_WEIGHTS_NAME)
        if self.source_skip is not None:
            skip = {k: v.detach().contiguous().cpu() for k, v in self.source_skip.state_dict().items()}
            save_file(skip, tmp / SOURCE_SKIP_WEIGHTS_NAME)
        (tmp / ORION_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    # ------------------------------------------------------------------ pieces

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.text_config.hidden_size

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.backbone.lm_head.weight

    def sequence_builder(self, **kwargs: Any) -> SequenceBuilder:
        return SequenceBuilder(self.processor, self.config.image_spec, **kwargs)

    def set_vision_tower_trainable(self, trainable: bool) -> None:
        """Vision tower + merger are frozen in every ORION stage (stage 0 base training may unfreeze)."""
        self.backbone.model.visual.requires_grad_(trainable)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Visual tokens from the vision tower + merger.

        Frozen (every ORION stage): no gradient, eval mode. Trainable (the small presets' stage-0
        base pretraining): an ordinary differentiable forward.
        """
        visual = self.backbone.model.visual
        if torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters()):
            return visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw).pooler_output
        return encode_images(self.backbone, pixel_values, image_grid_thw)

    @torch.no_grad()
    def standardize_visual_tokens(
        self, samples: list[tuple[torch.Tensor, torch.Tensor]], scale: float
    ) -> None:
        """Data-dependent initialisation of a *random* vision tower (small presets' stage 0 only).

        A randomly initialised tower + merger outputs nearly the same vector for every patch: on
        ShapesWorld the per-dimension spread of its tokens is about 2% of their norm. The LLM then
        has to find the picture in a tiny perturbation, and a vision head regressing those tokens
        gets a loss dominated by their constant part. Rescaling the merger's last linear layer per
        output dimension (an affine map, so no information is lost) gives tokens of mean 0 and
        standard deviation ``scale`` over ``samples`` (pixel_values, image_grid_thw pairs).
        """
        tokens = torch.cat([self.encode_images(px, grid) for px, grid in samples]).float()
        mean, std = tokens.mean(0), tokens.std(0).clamp_min(1e-6)
        last = self.backbone.model.visual.merger.mlp[-1]
        factor = (scale / std).to(last.weight.dtype)
        last.weight.mul_(factor.unsqueeze(1))
        last.bias.sub_(mean.to(last.bias.dtype)).mul_(factor)

    def batch_visual_tokens(self, batch: Batch) -> torch.Tensor | None:
        if batch.visual_tokens is not None:
            return batch.visual_tokens
        if batch.pixel_values is None:
            return None
        return self.encode_images(batch.pixel_values, batch.image_grid_thw)

    def batch_sources(self, batch: Batch, visual_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Each of ``batch.visual_positions``' edit-source token [K, d] (zero where a position has no
        source), or None: no skip, or no position with a source."""
        index = batch.visual_source_index
        if self.source_skip is None or index is None or visual_tokens is None:
            return None
        return visual_tokens[index.clamp_min(0)] * (index >= 0).unsqueeze(-1).to(visual_tokens.dtype)

    def source_inputs(self, sources: torch.Tensor | None) -> torch.Tensor | None:
        """``SourceSkip.inputs`` of ``batch_sources`` (None passes through)."""
        return None if sources is None or self.source_skip is None else self.source_skip.inputs(sources)

    def predict_visual_tokens(
        self, hidden: torch.Tensor, sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vision head on final hidden states [..., d] (or all layers' [L+1, ..., d] for layer_mix), plus
        the source skip's gated edit-source tokens ``sources`` [..., d] when given."""
        out = self.vision_head(hidden)
        if sources is not None and self.source_skip is not None:
            out = out + self.source_skip.outputs(sources).to(out.dtype)
        return out

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Full-vocabulary logits [B, S, V] (understanding / parity checks; not used in training)."""
        visual = self.batch_visual_tokens(batch)
        sources = self.batch_sources(batch, visual)
        hidden, _ = backbone_hidden_states(
            self.backbone, batch, visual, source_inputs=self.source_inputs(sources)
        )
        return self.backbone.lm_head(hidden)

    # ------------------------------------------------------------------ training forward

    def forward(
        self,
        batch: Batch,
        weights: LossWeights,
        teacher: nn.Module | None = None,
        *,
        chunk_size: int = 1024,
        visual_input_noise: float = 0.0,
        noise_schedule: str = "fixed",
        ce_weighting: str = "token",
    ) -> OrionOutput:
        """One teacher-forced pass: each loss term, unweighted, and its number of targets.

        ``weights`` only says which terms to compute (a term weighted 0 is skipped, ``None``);
        turning the terms into the step's loss is ``orion_mllm.losses.step_loss``. ``teacher`` is
        the ``KLTeacher`` (``orion_mllm.model.teacher``) the KL term needs.

        ``visual_input_noise``: std of Gaussian noise added to the *input* copies of generated images'
        tokens (never to targets, never to user images). Teacher forcing feeds the true previous
        tokens, inference feeds the model's own imperfect predictions; training on perturbed inputs
        keeps free-running generation from drifting away (exposure bias). Student and KL teacher
        read the same perturbed sequence. ``noise_schedule``: ``fixed`` (that std everywhere) or
        ``uniform`` (each generated image draws its own std uniformly in [0, visual_input_noise], so
        the model sees clean, lightly and heavily corrupted contexts and learns when to trust the text).

        ``ce_weighting``: how the CE averages its targets (``orion_mllm.losses.response_weights``):
        ``token`` (plain mean) or ``square`` (each response's tokens weigh 1 / sqrt(its length)).
        """
        if weights.kl > 0:
            _check_teacher(teacher)
        visual_tokens = self.batch_visual_tokens(batch)
        targets_clean = visual_tokens
        # The source skip reads the clean tokens: a source is a user image, never noised.
        sources = self.batch_sources(batch, targets_clean)
        if visual_input_noise > 0 and visual_tokens is not None and batch.visual_target_index.numel():
            merge = self.config.image_spec.merge_size
            visual_tokens = visual_tokens + input_noise(
                visual_tokens, batch.visual_target_index, batch.image_grid_thw, merge,
                visual_input_noise, schedule=noise_schedule,
            )  # fmt: skip
        head_needs_layers = self.vision_head.needs_all_layers
        # Stage 1 trains the head only: then the LLM pass needs no graph at all.
        llm_trainable = any(p.requires_grad for p in self.backbone.model.language_model.parameters()) or any(
            p.requires_grad for p in self.backbone.lm_head.parameters()
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and llm_trainable):
            hidden, layers = backbone_hidden_states(
                self.backbone, batch, visual_tokens, all_layers=head_needs_layers and weights.mse > 0,
                source_inputs=self.source_inputs(sources),
            )  # fmt: skip

        rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
        terms = LossTerms()
        visual_hidden = hidden[rows, cols]
        if weights.mse > 0:
            head_input = torch.stack([h[rows, cols] for h in layers]) if head_needs_layers else visual_hidden
            targets = (
                targets_clean[batch.visual_target_index]
                if targets_clean is not None
                else hidden.new_zeros(0, self.hidden_size)  # text-only batch: an empty, zero MSE
            )
            terms.mse = mse_loss(self.predict_visual_tokens(head_input, sources), targets.to(hidden.dtype))
        # labels are unshifted: the hidden at t predicts labels[t + 1].
        shifted = batch.labels[:, 1:]
        valid = shifted != IGNORE_INDEX
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        if weights.ce > 0:
            row_weights = None if ce_weighting == "token" else response_weights(valid, ce_weighting)
            terms.ce = cross_entropy_loss(
                hidden[b_idx, t_idx], self.lm_head_weight, shifted[b_idx, t_idx], chunk_size=chunk_size,
                row_weights=row_weights,
            )  # fmt: skip
        if weights.kl > 0:
            teacher_hidden = teacher(batch, visual_tokens)
            terms.kl = kl_divergence_loss(
                visual_hidden,
                self.lm_head_weight,
                teacher_hidden[rows, cols],
                teacher.lm_head_weight,
                chunk_size=chunk_size,
            )
        return OrionOutput(
            terms=terms,
            num_text_targets=int(b_idx.numel()),
            num_visual_targets=int(rows.numel()),
        )


def _check_teacher(teacher: object) -> None:
    """The KL term runs a ``KLTeacher`` (hidden states from its forward, its LM-head weight).

    ``model/teacher.py`` builds on this module, so the check names what a ``KLTeacher`` offers
    rather than importing it; a bare backbone or a whole ``OrionModel`` is refused by name.
    """
    if teacher is None:
        raise ValueError("KL weight > 0 needs a teacher: build one with make_teacher(model) before training")
    if isinstance(teacher, OrionModel) or not (
        isinstance(teacher, nn.Module) and hasattr(teacher, "lm_head_weight")
    ):
        raise TypeError(
            f"the KL teacher must be a KLTeacher (orion_mllm.model.teacher: make_teacher, load_teacher, "
            f"or KLTeacher(backbone)), got {type(teacher).__name__}"
        )


NOISE_SCHEDULES = ("fixed", "uniform")


def input_noise(
    tokens: torch.Tensor, target_index: torch.Tensor, grid_thw: torch.Tensor, merge: int, std: float,
    *, schedule: str = "fixed",
) -> torch.Tensor:  # fmt: skip
    """Gaussian noise [T, d] for the input copies of generated images' tokens (zero on user images).

    ``tokens`` are all images' tokens in batch order, ``grid_thw`` their grids, ``target_index`` the
    rows that are generation targets. ``fixed``: std ``std`` for every generated image; ``uniform``:
    one std per generated image drawn from U(0, std)."""
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise schedule {schedule!r}: choose one of {', '.join(NOISE_SCHEDULES)}")
    per_image = (grid_thw.prod(-1) // (merge * merge)).to(tokens.device)
    image_of_row = torch.repeat_interleave(torch.arange(len(per_image), device=tokens.device), per_image)
    is_target = torch.zeros(len(per_image), dtype=torch.bool, device=tokens.device)
    is_target[image_of_row[target_index].unique()] = True
    level = torch.full((len(per_image),), float(std), device=tokens.device)
    if schedule == "uniform":
        level = level * torch.rand(len(per_image), device=tokens.device)
    level = torch.where(is_target, level, torch.zeros_like(level))
    rows = is_target[image_of_row]
    noise = torch.zeros_like(tokens)
    noise[rows] = torch.randn(int(rows.sum()), tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
    return noise * level[image_of_row].unsqueeze(1).to(tokens.dtype)


def _recover_interrupted_save(path: Path) -> None:
    """A save killed between its two renames leaves the previous model at ``.NAME.old-PID``: restore it."""
    if path.exists():
        return
    complete = [d for d in path.parent.glob(f".{path.name}.old-*") if (d / ORION_CONFIG_NAME).is_file()]
    if complete:
        newest = max(complete, key=lambda d: d.stat().st_mtime)
        newest.rename(path)
        warnings.warn(f"restored {path} from {newest.name}, left by an interrupted save", stacklevel=3)


def _head_config(backbone: Qwen2_5_VLForConditionalGeneration, head: str, mlp_ratio: int) -> HeadConfig:
    text = backbone.config.text_config
    return HeadConfig(
        name=head,
        hidden_size=text.hidden_size,
        mlp_ratio=mlp_ratio,
        num_hidden_states=text.num_hidden_layers + 1 if head == "layer_mix" else None,
    )
