"""Architecture presets: which Qwen2.5-VL shapes a named model has, and the image resolutions it uses.

A preset fixes everything that is part of the *architecture* (the transformers config of the
backbone, the tokenizer size, patch and merge sizes, the generation grid and the understanding
resolution range). Training hyper-parameters live in recipes, never here.

- ``micro`` / ``tiny``: the same classes as Qwen2.5-VL at a size that trains on 2 CPU cores; their
  tokenizer is built locally (see ``model/tokenizer.py``).
- ``qwen2.5-vl-3b`` / ``qwen2.5-vl-7b``: the released architectures (random init), for benchmarks.
  Real weights are loaded from a local Hugging Face directory instead (``model/backbone.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orion_mllm.images import ImageSpec

# Normalisation constants Qwen2.5-VL's image processor uses (OpenAI CLIP's).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextArch:
    """The LLM half of a Qwen2.5-VL config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None  # None: the tokenizer's length rounded up to a multiple of 64
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """M-RoPE split of head_dim/2 frequencies into (temporal, height, width), Qwen's 1:1.5:1.5 ratio."""
        half = self.head_dim // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


@dataclass(frozen=True)
class VisionArch:
    """The vision tower + merger half of a Qwen2.5-VL config."""

    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    patch_size: int
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2


@dataclass(frozen=True)
class Preset:
    """A named architecture plus the image resolutions it is trained at."""

    name: str
    text: TextArch
    vision: VisionArch
    gen_image_size: int  # side of the square generation target, pixels
    und_min_long_side: int  # understanding images: long side clamped into [min, max]
    und_max_long_side: int
    tokenizer_vocab_size: int = 1024  # for the locally built tokenizer (BPE vocab before special tokens)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pixel_factor(self) -> int:
        """Image sides must be multiples of this (patch x merge), as in Qwen's smart_resize."""
        return self.vision.patch_size * self.vision.spatial_merge_size

    @property
    def gen_grid(self) -> tuple[int, int, int]:
        """(t, h, w) patch grid of a generation target, before the 2x2 merge."""
        side = self.gen_image_size // self.vision.patch_size
        return (1, side, side)

    @property
    def gen_num_tokens(self) -> int:
        """Visual tokens per generated image (252 px -> 81 at real scale)."""
        _, h, w = self.gen_grid
        return (h // self.vision.spatial_merge_size) * (w // self.vision.spatial_merge_size)

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(
            patch_size=self.vision.patch_size,
            merge_size=self.vision.spatial_merge_size,
            gen_image_size=self.gen_image_size,
            und_min_long_side=self.und_min_long_side,
            und_max_long_side=self.und_max_long_side,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Fail fast on shapes transformers would only reject deep inside a forward pass."""
        problems = []
        if self.text.hidden_size % self.text.num_attention_heads:
            problems.append("text.hidden_size must be divisible by text.num_attention_heads")
        if self.text.num_attention_heads % self.text.num_key_value_heads:
            problems.append("text.num_attention_heads must be divisible by text.num_key_value_heads")
        if self.vision.hidden_size % self.vision.num_heads:
            problems.append("vision.hidden_size must be divisible by vision.num_heads")
        if self.gen_image_size % self.pixel_factor:
            problems.append(f"gen_image_size={self.gen_image_size} must be a multiple of {self.pixel_factor}")
        if not (self.pixel_factor <= self.und_min_long_side <= self.und_max_long_side):
            problems.append("need pixel_factor <= und_min_long_side <= und_max_long_side")
        if any(i >= self.vision.depth for i in self.vision.fullatt_block_indexes):
            problems.append("vision.fullatt_block_indexes must be < vision.depth")
        if problems:
            raise ValueError(f"preset {self.name!r} is invalid: " + "; ".join(problems))


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro",
        description="smoke-test size: trains in seconds on 2 CPU cores",
        text=TextArch(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=None,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
        vision=VisionArch(
            hidden_size=32,
            intermediate_size=64,
            depth=2,
            num_heads=2,
            patch_size=8,
            window_size=32,
            fullatt_block_indexes=(1,),
        ),
        gen_image_size=48,  # 6x6 patches -> 3x3 = 9 visual tokens
        und_min_long_side=32,
        und_max_long_side=96,
        tokenizer_vocab_size=640,
    ),
    "tiny": Preset(
        name="tiny",
        description="ShapesWorld default: learns the world in minutes on 2 CPU cores",
        text=TextArch(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=None,
            tie_word_embeddings=False,
            max_position_embeddings=8192,
        ),
        vision=VisionArch(
            hidden_size=64,
            intermediate_size=128,
            depth=4,
            num_heads=4,
            patch_size=8,
            window_size=64,
            fullatt_block_indexes=(1, 3),
        ),
        gen_image_size=64,  # 8x8 patches -> 4x4 = 16 visual tokens
        und_min_long_side=32,
        und_max_long_side=128,
        tokenizer_vocab_size=1024,
    ),
    "qwen2.5-vl-3b": Preset(
        name="qwen2.5-vl-3b",
        description="Qwen2.5-VL-3B-Instruct architecture, random init (benchmarks)",
        text=TextArch(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=128000,
        ),
        vision=VisionArch(
            hidden_size=1280,
            intermediate_size=3420,
            depth=32,
            num_heads=16,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=(7, 15, 23, 31),
        ),
        gen_image_size=252,  # 18x18 patches -> 9x9 = 81 visual tokens
        und_min_long_side=56,
        und_max_long_side=1024,
    ),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b",
        description="Qwen2.5-VL-7B-Instruct architecture, random init (benchmarks)",
        text=TextArch(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,  # the 7B ships a larger embedding than the 3B
            tie_word_embeddings=False,
            max_position_embeddings=128000,
        ),
        vision=VisionArch(
            hidden_size=1280,
            intermediate_size=3420,
            depth=32,
            num_heads=16,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=(7, 15, 23, 31),
        ),
        gen_image_size=252,
        und_min_long_side=56,
        und_max_long_side=1024,
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the known ones."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    preset.validate()
    return preset
