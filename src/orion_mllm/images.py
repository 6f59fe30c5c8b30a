"""Loading images with clear errors, and sizing them the way ORION feeds them to Qwen2.5-VL.

- Understanding inputs (user turns): aspect ratio kept, long side clamped into
  [und_min_long_side, und_max_long_side], both sides rounded to a multiple of patch x merge
  (28 at real scale, as Qwen's smart_resize does).
- Generation targets (assistant turns): a fixed square of ``gen_image_size`` pixels (252 at real
  scale -> 9x9 = 81 visual tokens), so every generated image has the same token grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class ImageSpec:
    """The resolutions a model was trained at; saved in ``orion_config.json``."""

    patch_size: int
    merge_size: int
    gen_image_size: int
    und_min_long_side: int
    und_max_long_side: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def gen_grid_thw(self) -> tuple[int, int, int]:
        side = self.gen_image_size // self.patch_size
        return (1, side, side)

    @property
    def gen_num_tokens(self) -> int:
        side = self.gen_image_size // self.factor
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"image spec: unknown keys {sorted(unknown)}")
        return cls(**data)


class ImageLoadError(ValueError):
    """An image path that is missing or not a readable image."""


def load_image(image: ImageLike, *, where: str = "") -> Image.Image:
    """Open an image (path or PIL) as RGB; errors name the file and the record they came from."""
    prefix = f"{where}: " if where else ""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, str | Path):
        raise ImageLoadError(
            f"{prefix}an image must be a file path or a PIL image, got {type(image).__name__}"
        )
    path = Path(image)
    if path.is_dir():
        raise ImageLoadError(f"{prefix}image path is a directory, not a file: {path}")
    if not path.is_file():
        raise ImageLoadError(f"{prefix}image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not deep in training
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{prefix}cannot read image {path}: {err}") from err


def understanding_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """(width, height) with the long side clamped and both sides multiples of the patch factor."""
    factor = spec.factor
    long_side = max(width, height)
    target_long = min(max(long_side, spec.und_min_long_side), spec.und_max_long_side)
    scale = target_long / long_side

    def snap(x: float) -> int:
        return max(factor, round(x * scale / factor) * factor)

    new_w, new_h = snap(width), snap(height)
    # Rounding can push the long side one factor past the cap; pull it back.
    limit = (spec.und_max_long_side // factor) * factor
    return min(new_w, limit), min(new_h, limit)


def resize_for_understanding(image: Image.Image, spec: ImageSpec) -> Image.Image:
    size = understanding_size(image.width, image.height, spec)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def resize_for_generation(image: Image.Image, spec: ImageSpec) -> Image.Image:
    size = (spec.gen_image_size, spec.gen_image_size)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
