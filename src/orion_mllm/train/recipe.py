"""Training recipes: one YAML file per stage, validated strictly, overridable from the command line.

A recipe says *what* a stage trains (which parameters, which losses and weights, the optimizer and
schedule, resolutions, the data mixture); the model architecture comes from the model it starts
from. Validation is strict: an unknown key, a wrong type or a value out of range is an error that
names the key (``optim.max_lr: Input should be greater than 0``). Overrides use dotted keys:
``load_recipe(path, ["optim.max_lr=2e-4", "train.max_steps=10"])``; values are parsed as YAML.

Stage rules enforced here (paper 3.3.2, Table 1): the vision tower and merger stay frozen in the
ORION stages (warmup, pretrain, sft); warm-up trains the head only with MSE only; pretrain and SFT
train LLM + head. ``base`` is the understanding-only pretraining of the small presets' base VLM.

This module only loads and checks recipes; the trainer that runs them is separate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orion_mllm.data.entries import DatasetEntry
from orion_mllm.losses import LossWeights

Stage = Literal["base", "warmup", "pretrain", "sft"]  # "decoder" recipes are a DecoderRecipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class TowerPretrainSection(_Strict):
    """Dense ShapesWorld pre-training of a random tower before stage 0 (train/tower_pretrain.py)."""

    steps: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    # Weight of the per-token pixel reconstruction beside the colour and shape classification; it
    # keeps the tokens invertible for the decoder that renders generated tokens.
    recon_weight: float = Field(1.0, ge=0)
    # Weight of each token's regression of its own place (row, column) in the picture: the tower has
    # no absolute position embedding, and position questions need tokens that say where they are.
    position_weight: float = Field(0.0, ge=0)


class ModelSection(_Strict):
    # Where the weights start: 'preset:NAME', a Qwen2.5-VL or ORION directory, or 'previous'
    # (the previous stage's output).
    init: str
    head: Literal["linear", "mlp", "qformer", "layer_mix"] = "mlp"
    mlp_ratio: int = Field(8, ge=1)
    # "documents": packed rows attend per document (one causal sdpa call each) instead of through a dense
    # block-diagonal mask (model/document_attention.py); the language model only.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "documents"] = "sdpa"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Stage base from a preset only: standardise the random tower's tokens on this many images of
    # the recipe's data before training (OrionModel.standardize_visual_tokens); 0 = off.
    standardize_tokens_images: int = Field(0, ge=0)
    standardize_tokens_scale: float = Field(0.1, gt=0)
    # Stage base from a preset only: pre-train the random tower + merger on a dense objective over
    # the recipe's ShapesWorld scenes first (the stand-in for Qwen2.5-VL's tower pre-training).
    tower_pretrain: TowerPretrainSection | None = None
    # Editing: add each edit source's token at grid cell j to the input that regresses the edited
    # image's token j, through a learned, zero-initialised linear map (OrionModel.source_skip). A
    # model that has one keeps it; false with such a model is refused.
    source_skip: bool = False


class Trainable(_Strict):
    vision_tower: bool = False
    # The merger alone (the MLP that turns 2x2 patch features into one LLM token: Qwen2.5-VL's
    # projector), the tower's blocks staying frozen; stage base only, like vision_tower.
    merger: bool = False
    llm: bool
    head: bool


class OptimSection(_Strict):
    max_lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    scheduler: Literal["constant", "cosine"]
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-15, gt=0)
    grad_clip: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _lr_order(self) -> OptimSection:
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed max_lr ({self.max_lr})")
        if self.scheduler == "constant" and self.min_lr != self.max_lr:
            raise ValueError("a constant schedule needs min_lr == max_lr")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        return self


class StepsSection(_Strict):
    """How long a run is and how it reads data: shared by stage and decoder recipes."""

    epochs: float = Field(gt=0)
    global_batch_size: int = Field(gt=0, description="samples per optimizer step, all devices together")
    max_steps: int | None = Field(None, gt=0, description="cap on optimizer steps (smoke runs)")
    seed: int = 0
    max_bad_sample_share: float = Field(
        0.01, ge=0, le=1, description="abort when more than this share of samples is unreadable"
    )
    log_every: int = Field(10, gt=0, description="steps between plain log lines when not on a terminal")


class TrainSection(StepsSection):
    micro_batch_size: int = Field(gt=0, description="samples per device per forward")
    packing: bool = Field(True, description="pack samples into rows of pack_tokens (else pad micro-batches)")
    pack_tokens: int = Field(4096, gt=0, description="token budget of one packed micro-batch row")
    activation_checkpointing: bool = False
    visual_input_noise: float = Field(
        0.0, ge=0, description="std of Gaussian noise added to generated images' teacher-forced input tokens"
    )
    visual_input_noise_schedule: Literal["fixed", "uniform"] = Field(
        "fixed", description="fixed: that std for every generated image; uniform: a std drawn per image "
        "from U(0, visual_input_noise)",
    )  # fmt: skip
    mse_normalize: bool = Field(
        False, description="divide the MSE term by the generation targets' mean per-dimension variance, "
        "measured on the stage's first batches (train/token_stats.py), so loss weights mean the same at "
        "every token scale",
    )  # fmt: skip
    prompt_dropout: float = Field(
        0.0, ge=0, le=1,
        description="share of generation/editing samples trained without their request text "
        "(the unconditional branch of token-space classifier-free guidance)",
    )  # fmt: skip
    ce_weighting: Literal["token", "square"] = Field(
        "token", description="token: the CE is the mean over answer tokens; square: each response's tokens "
        "weigh 1/sqrt(its length) (InternVL 2.5's square averaging), so one-word answers are not drowned "
        "by long captions",
    )  # fmt: skip


class ResolutionSection(_Strict):
    gen_min_long_side: int = Field(gt=0)
    gen_max_long_side: int = Field(gt=0)
    und_min_long_side: int | None = Field(None, gt=0)
    und_max_long_side: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> ResolutionSection:
        if self.gen_min_long_side > self.gen_max_long_side:
            raise ValueError("gen_min_long_side must not exceed gen_max_long_side")
        if (self.und_min_long_side is None) != (self.und_max_long_side is None):
            raise ValueError("give both und_min_long_side and und_max_long_side, or neither")
        if self.und_min_long_side is not None and self.und_min_long_side > self.und_max_long_side:
            raise ValueError("und_min_long_side must not exceed und_max_long_side")
        return self


class ShapesDataSection(_Strict):
    """ShapesWorld data written to ``data_root`` when it is missing (small-scale recipes)."""

    size: int = Field(64, gt=0)
    n_und: int = Field(1000, ge=0)
    n_gen: int = Field(1000, ge=0)
    n_edit: int = Field(500, ge=0)
    n_interleaved: int = Field(100, ge=0)
    n_heldout: int = Field(100, ge=0)
    seed: int = 0
    gen_layout: Literal["canonical", "random"] = Field(
        "canonical", description="text-to-image targets: the caption's canonical picture, or free layouts"
    )
    # The default is what every recipe meant before the key existed (a key added later must not change
    # what an older run or committed base recorded); the tree's recipes say `holdout: captions`.
    holdout: Literal["captions", "pairs"] = Field(
        "pairs", description="what training never sees: a fifth of the text-to-image captions, or "
        "three colour-shape pairs and four-of-a-shape in any file (orion_mllm.data.shapes.datasets.Holdout)",
    )  # fmt: skip
    caption_order: Literal["scene", "shape", "colour", "split"] = Field(
        "scene", description="the order und.jsonl's captions list objects in: the scene's (random), or "
        "sorted by shape, by colour, or by shape for 'Describe the shapes you see.' and by colour otherwise "
        "(orion_mllm.data.shapes.datasets.CAPTION_ORDERS)",
    )  # fmt: skip
    add_layout: Literal["canonical", "random"] = Field(
        "random", description="where edit.jsonl's 'add' edits put the new object: a small one on the first "
        "free fixed slot (a function of the source, orion_mllm.data.shapes.datasets.canonical_addition), or "
        "anywhere at random",
    )  # fmt: skip
    question_first: bool = Field(
        False, description="und.jsonl asks its first question before the picture ('Q\\n<image>'), so every "
        "visual token can attend to it; false: LLaVA's '<image>\\nQ'. Evaluations ask a model trained so "
        "the same way (orion eval shapes-und --question-first)",
    )  # fmt: skip
    mcq_answer: Literal["letter", "reasoned"] = Field(
        "letter", description="und.jsonl's multiple-choice answers: the option's letter, or 'The star is "
        "red, so B.' (the colour, then the letter copied from the option naming it)",
    )  # fmt: skip


class CheckpointSection(_Strict):
    every: int = Field(500, gt=0)
    keep: int = Field(2, gt=0)


class AnomalySection(_Strict):
    """Step skipping (``train/anomaly.py``): NaN/Inf or a gradient-norm spike; abort after a run of them."""

    spike_factor: float = Field(10.0, gt=1)
    window: int = Field(200, gt=0)
    min_history: int = Field(20, gt=0)
    max_consecutive: int = Field(5, gt=0)


class DriftSection(_Strict):
    """Semantic-drift probe of stages 2-3 (``eval/drift.py``): KL(base || model) of the text head at the
    visual positions of a fixed batch of generation records, logged as ``drift_kl``."""

    every: int = Field(50, ge=0, description="steps between probes (0: off); the last step is always probed")
    samples: int = Field(16, gt=0, description="generation records in the probe batch")
    path: str | None = Field(
        None, description="JSONL of generation records, relative to data_root (default: the first "
        "generation entry of data)",
    )  # fmt: skip


class RunRecipe(_Strict):
    """What every run recipe has, stage or decoder: optimizer, steps, resolutions, data, checkpoints and
    the anomaly guard (``train/loop.py`` runs them). Subclasses add what they train. Saved recipes list
    these shared sections first, then the subclass's own."""

    stage: str
    description: str = ""
    optim: OptimSection
    train: StepsSection
    resolution: ResolutionSection
    data_root: str | None = None
    shapes_data: ShapesDataSection | None = None
    data: list[DatasetEntry] = Field(min_length=1)
    checkpoint: CheckpointSection = CheckpointSection()
    anomaly: AnomalySection = AnomalySection()


class Recipe(RunRecipe):
    """One ORION stage (base, warmup, pretrain, sft): its model, teacher, trained parts and losses."""

    stage: Stage
    model: ModelSection
    teacher: str | None = Field(
        None, description="KL teacher: the original base model (default: the stage-1 start)"
    )
    trainable: Trainable
    # The CE:MSE:KL weights; LossWeights validates them (finite, >= 0, one > 0), nothing else does.
    loss: LossWeights
    train: TrainSection
    drift: DriftSection = DriftSection()
    guidance: float = Field(
        1.0, ge=0, description="token-space classifier-free guidance the exported model generates with "
        "by default (1: none; > 1 needs train.prompt_dropout in its training)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _stage_rules(self) -> Recipe:
        t, loss = self.trainable, self.loss
        if self.stage != "base" and (t.vision_tower or t.merger):
            raise ValueError(f"stage {self.stage}: the vision tower and merger stay frozen in ORION stages")
        if self.stage == "warmup" and (t.llm or not t.head or loss.ce or loss.kl):
            raise ValueError("stage warmup trains the head only with MSE only (trainable.llm=false, ce=kl=0)")
        if self.stage in ("pretrain", "sft") and not (t.llm and t.head):
            raise ValueError(f"stage {self.stage} trains LLM + head (trainable.llm and trainable.head true)")
        if self.model.standardize_tokens_images and (
            self.stage != "base" or not self.model.init.startswith("preset:")
        ):
            raise ValueError(
                "model.standardize_tokens_images re-initialises a random tower: stage base from a preset only"
            )
        if self.model.tower_pretrain is not None and (
            self.stage != "base" or not self.model.init.startswith("preset:")
        ):
            raise ValueError("model.tower_pretrain trains a random tower: stage base from a preset only")
        if self.stage == "base" and (t.head or loss.mse or loss.kl):
            raise ValueError("stage base is understanding-only: no head, mse=kl=0")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError("train.global_batch_size must be a multiple of train.micro_batch_size")
        return self


class DecoderSection(_Strict):
    """The diffusion decoder (``orion_mllm.decoder``): architecture preset and flow-matching options."""

    preset: Literal["micro", "tiny", "flux-dev"] = "tiny"
    patch_size: int | None = Field(None, gt=0, description="override the preset's patch size")
    prediction: Literal["velocity", "sample"] | None = Field(None, description="override the preset's target")
    spatial_cond: int | None = Field(None, ge=0, description="per-patch token channels (0: attention only)")
    coarse_rank: int | None = Field(
        None, ge=0, description="rank of the fitted linear coarse estimate (pixel presets; 0: off)"
    )
    coarse_fit_images: int = Field(3000, ge=2, description="images the coarse estimate is fitted on")
    coarse_ridge: float = Field(
        1e-4, gt=0, description="ridge penalty of the coarse fit, per image, on standardised token features"
    )
    loss_space: Literal["velocity", "sample"] = Field(
        "velocity", description="flow-matching error on the velocity (FLUX) or on the implied clean sample"
    )
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="share of conditions dropped (CFG)")
    time_shift: float = Field(1.0, gt=0, description="FLUX timestep shift (train and sample)")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA of the weights; null: no EMA")
    sample_steps: int = Field(20, gt=0, description="default sampling steps saved with the decoder")
    cfg_scale: float = Field(1.0, ge=0, description="default guidance scale saved with the decoder")


class DecoderRecipe(RunRecipe):
    """Decoder training: images -> frozen vision-tower tokens (condition) -> the same image (target)."""

    stage: Literal["decoder"]
    encoder: str = Field(
        description="whose vision tower makes the tokens: 'previous' (the finished stage-0 base run next "
        "to this one), 'preset:NAME', or a Qwen2.5-VL / ORION directory"
    )
    decoder: DecoderSection = DecoderSection()


class RecipeError(ValueError):
    """A recipe file or override that does not validate; the message names file and keys."""


# Short forms accepted on the command line.
OVERRIDE_ALIASES = {"max_steps": "train.max_steps", "seed": "train.seed"}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (value parsed as YAML) in a nested dict; returns a new dict."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key.sub=value")
        key = OVERRIDE_ALIASES.get(key, key)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else None
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # the latter: loss section
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe | DecoderRecipe:
    """A stage recipe (``Recipe``), or a ``DecoderRecipe`` when ``stage: decoder``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        if data.get("stage") == "decoder":
            return DecoderRecipe.model_validate(data)
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{where}: {_format_errors(err)}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe | DecoderRecipe:
    """Read, override and validate a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    return parse_recipe(data, str(path))


def recipe_to_yaml(recipe: Recipe | DecoderRecipe) -> str:
    """The resolved recipe, as saved in a run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
