"""The Qwen2.5-VL backbone: build it from a preset or load it from a local Hugging Face directory.

We use transformers' own ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2_5_VLProcessor`` (no
fork). Two ways in:

- ``build_backbone(preset)``: random init of a named architecture, with a locally built tokenizer
  for the small presets (nothing is downloaded).
- ``load_backbone(path)``: a local directory holding ``config.json``, safetensors shards and the
  processor / tokenizer / chat template files, e.g. a downloaded Qwen2.5-VL-7B-Instruct.

Also here: the frozen visual encoder call (vision tower + merger -> visual tokens), which gives
both the inputs for understanding and the regression targets for generation.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from orion_mllm.config import IMAGE_MEAN, IMAGE_STD, Preset
from orion_mllm.model.document_attention import RECIPE_NAME as DOCUMENTS
from orion_mllm.model.document_attention import use_document_attention
from orion_mllm.model.tokenizer import build_tokenizer

# "documents": per-document attention for packed rows (model/document_attention.py), the language model
# only; the backbone is built with sdpa and switched after.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", DOCUMENTS)


def _built_with(name: str) -> str:
    """The transformers implementation a backbone is built or loaded with for ``name``."""
    return "sdpa" if name == DOCUMENTS else name


def _switch(model: Qwen2_5_VLForConditionalGeneration, name: str) -> None:
    if name == DOCUMENTS:
        use_document_attention(model)


def resolve_attn_implementation(name: str = "sdpa") -> str:
    """Check the requested attention kernel is usable here; flash-attention needs its package and CUDA."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r}; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package installed")
        if not torch.cuda.is_available():
            raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device")
    return name


def _image_processor_class():
    """Qwen2VLImageProcessor needs torchvision in transformers 5.x; the PIL twin needs nothing extra.

    Both implement the same resize / normalise / patchify, so processors built either way give the
    same pixel values. We pick the torchvision one only when torchvision is importable.
    """
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def build_image_processor(preset: Preset):
    """An image processor whose own smart-resize leaves our pre-sized images untouched.

    We size images ourselves (``orion_mllm.images``), so the processor's pixel bounds are set wide:
    min = one merged patch, max = the largest image we ever feed it.
    """
    factor = preset.pixel_factor
    largest = max(preset.und_max_long_side, preset.gen_image_size)
    return _image_processor_class()(
        patch_size=preset.vision.patch_size,
        merge_size=preset.vision.spatial_merge_size,
        temporal_patch_size=preset.vision.temporal_patch_size,
        min_pixels=factor * factor,
        max_pixels=largest * largest,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


class ImageQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor.

    In transformers 5.x the processor insists on a video processor, which needs torchvision; the
    CPU torch build we install has none. ORION never feeds video, so this subclass drops that one
    attribute and inherits everything else (chat template, ``<|image_pad|>`` expansion,
    ``mm_token_type_ids``) unchanged. On disk it is saved as a plain Qwen2.5-VL processor
    (``save_processor``), so ``AutoProcessor`` loads it wherever torchvision is installed.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent's token bookkeeping, minus the video processor it would also register.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def build_processor(preset: Preset) -> ImageQwen2_5_VLProcessor:
    """Tokenizer (built locally) + image processor + Qwen2.5-VL chat template, as one processor."""
    tokenizer = build_tokenizer(
        preset.tokenizer_vocab_size, model_max_length=preset.text.max_position_embeddings
    )
    return ImageQwen2_5_VLProcessor(
        image_processor=build_image_processor(preset),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def save_processor(processor: Qwen2_5_VLProcessor, path: str | Path) -> None:
    """Write tokenizer, image-processor config and chat template the way Qwen2.5-VL checkpoints ship them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(path)
    image_config = processor.image_processor.to_dict()
    # Name the torchvision-backed class and the stock processor: plain transformers then loads this
    # directory with AutoProcessor (falling back to the PIL image processor without torchvision).
    image_config["image_processor_type"] = "Qwen2VLImageProcessor"
    image_config["processor_class"] = "Qwen2_5_VLProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
    (path / "chat_template.jinja").write_text(processor.chat_template)


def load_processor(path: str | Path) -> ImageQwen2_5_VLProcessor:
    """Load the processor saved in a model directory, without needing torchvision.

    ``AutoProcessor`` would also try to build the video processor, which needs torchvision in
    transformers 5.x; ORION never feeds video, so we assemble the processor from its parts.
    """
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = _image_processor_class().from_pretrained(path)
    chat_template = _read_chat_template(path) or tokenizer.chat_template
    if chat_template is None:
        raise ValueError(
            f"{path}: no chat template found "
            "(chat_template.jinja, chat_template.json or tokenizer_config.json)"
        )
    return ImageQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def _read_chat_template(path: Path) -> str | None:
    """The processor-level template (multimodal) wins over the tokenizer's: .jinja (transformers 5
    layout) first, then chat_template.json (how Qwen2.5-VL checkpoints on the Hub ship it)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = path / "chat_template.json"
    if legacy.is_file():
        try:
            return json.loads(legacy.read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{legacy}: expected a JSON object with a 'chat_template' string ({err})"
            ) from err
    return None


def build_qwen_config(preset: Preset, tokenizer, attn_implementation: str = "sdpa") -> Qwen2_5_VLConfig:
    """The transformers config of a preset; special-token ids come from the tokenizer."""
    t, v = preset.text, preset.vision
    vocab_size = t.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(f"preset {preset.name}: vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _SPECIAL_IDS.items()}
    text_config = {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": t.mrope_section,
        },
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": ids["eos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    vision_config = {
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "out_hidden_size": t.hidden_size,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "tokens_per_second": v.tokens_per_second,
        "hidden_act": "silu",
        "in_channels": 3,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=t.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    return config


_SPECIAL_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>",
}


def build_backbone(
    preset: Preset, *, attn_implementation: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Random-init backbone of a preset plus its processor. Deterministic for a given seed."""
    attn_implementation = resolve_attn_implementation(attn_implementation)
    processor = build_processor(preset)
    config = build_qwen_config(preset, processor.tokenizer, _built_with(attn_implementation))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        config, attn_implementation=_built_with(attn_implementation), dtype=dtype
    )
    _switch(model, attn_implementation)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model, processor


def load_backbone(
    path: str | Path, *, attn_implementation: str = "sdpa", dtype: torch.dtype | str = torch.float32
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Load a Qwen2.5-VL Hugging Face directory (config + safetensors + processor files) from disk."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
    config = Qwen2_5_VLConfig.from_pretrained(path)
    if config.model_type != "qwen2_5_vl":
        raise ValueError(f"{path}/config.json: model_type={config.model_type!r}, expected 'qwen2_5_vl'")
    attn_implementation = resolve_attn_implementation(attn_implementation)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path,
        attn_implementation=_built_with(attn_implementation),
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
    )
    _switch(model, attn_implementation)
    return model, load_processor(path)


@torch.no_grad()
def encode_images(
    backbone: Qwen2_5_VLForConditionalGeneration, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
) -> torch.Tensor:
    """Visual tokens [sum of tokens, llm hidden] from the frozen vision tower + merger.

    These are exactly the vectors Qwen2.5-VL puts at ``<|image_pad|>`` positions, in the same order
    (merged 2x2 blocks, row-major over the merged grid, images one after another).
    """
    visual = backbone.model.visual
    was_training = visual.training
    visual.eval()  # frozen encoder: no dropout, targets must not depend on the mode
    try:
        out = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
    finally:
        visual.train(was_training)
    return out.pooler_output
