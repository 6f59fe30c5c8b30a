"""Anti-aliased rendering of ShapesWorld scenes with PIL (supersample, then box-filter down)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .world import COLOURS, UNIT_POLYGONS, Scene

BACKGROUND = (255, 255, 255)


def render_scene(scene: Scene, size: int, *, supersample: int = 4) -> Image.Image:
    """Render ``scene`` to a ``size`` x ``size`` RGB image on white; byte-identical for equal inputs."""
    if not 8 <= size <= 4096:
        raise ValueError(f"size must be in 8..4096, got {size}")
    if supersample < 1:
        raise ValueError("supersample must be >= 1")
    big = size * supersample
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        cx, cy, ext = obj.x * big, obj.y * big, obj.extent * big
        if obj.shape == "circle":
            r = ext / 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pts = [(cx + px * ext, cy + py * ext) for px, py in UNIT_POLYGONS[obj.shape]]
            draw.polygon(pts, fill=fill)
    if supersample > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img


def render_object_map(scene: Scene, width: int, height: int | None = None) -> Image.Image:
    """Which object covers each pixel: an ``L`` image, 0 = background, ``i + 1`` = ``scene.objects[i]``.

    Same geometry as :func:`render_scene` (no anti-aliasing, so every pixel has one owner); the dense
    targets of the small presets' tower pre-training are read from it.
    """
    height = width if height is None else height
    if len(scene.objects) > 254:
        raise ValueError(f"an object map holds at most 254 objects, got {len(scene.objects)}")
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for index, obj in enumerate(scene.objects, start=1):
        cx, cy = obj.x * width, obj.y * height
        ext_x, ext_y = obj.extent * width, obj.extent * height
        if obj.shape == "circle":
            draw.ellipse([cx - ext_x / 2, cy - ext_y / 2, cx + ext_x / 2, cy + ext_y / 2], fill=index)
        else:
            pts = [(cx + px * ext_x, cy + py * ext_y) for px, py in UNIT_POLYGONS[obj.shape]]
            draw.polygon(pts, fill=index)
    return img
