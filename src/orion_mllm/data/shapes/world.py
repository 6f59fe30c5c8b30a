"""ShapesWorld vocabulary and scene sampling.

A scene is a handful (1-4) of flat, axis-aligned coloured shapes on a white canvas. Each object is
described by its kind (``shape``), ``colour``, named ``size`` and the centre ``(x, y)`` of its bounding
box in normalised image coordinates (``[0, 1]``, y pointing down). The size is the object's extent: the
larger side of its bounding box as a fraction of the image side.

Objects never overlap: their bounding circles keep a margin (:data:`GAP`) between each other and their
bounding boxes keep :data:`EDGE_MARGIN` from the image border, so the pixel-only scorer in
:mod:`orion_mllm.data.shapes.scorer` sees separate, complete objects even after blur or a small shift.
Everything is deterministic for a given :class:`random.Random` state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Well separated along the white -> colour mixing lines the scorer uses (see scorer.py).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (240, 200, 0),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "purple": (130, 40, 170),
    "pink": (255, 105, 200),
    "black": (20, 20, 20),
}

SIZES: dict[str, float] = {"small": 0.2, "medium": 0.28, "large": 0.38}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

EDGE_MARGIN = 0.05  # min distance of an object's bounding box from the image border
GAP = 0.04  # min gap between the bounding circles of two objects
STAR_INNER = 0.42  # inner / outer radius of the five-pointed star


def _star_points(inner: float = STAR_INNER) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_CROSS_T = 1.0 / 6.0  # half arm width (arm width = 1/3 of the extent)
_UNIT_POLYS: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "star": _star_points(),
    "cross": [
        (-_CROSS_T, -0.5), (_CROSS_T, -0.5), (_CROSS_T, -_CROSS_T), (0.5, -_CROSS_T), (0.5, _CROSS_T),
        (_CROSS_T, _CROSS_T), (_CROSS_T, 0.5), (-_CROSS_T, 0.5), (-_CROSS_T, _CROSS_T), (-0.5, _CROSS_T),
        (-0.5, -_CROSS_T), (-_CROSS_T, -_CROSS_T),
    ],
}  # fmt: skip
_TRIANGLE_ASPECT = math.sqrt(3.0) / 2.0  # equilateral: height / width


def _normalise(pts: list[tuple[float, float]], aspect: float | None = None) -> list[tuple[float, float]]:
    """Scale a polygon so its bounding box is centred at 0 with larger side 1 (optionally fix h/w)."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    sy = 1.0
    if aspect is not None:
        sy = aspect * w / h
        h = h * sy
    s = 1.0 / max(w, h)
    return [((x - cx) * s, (y - cy) * sy * s) for x, y in pts]


UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    k: _normalise(v, _TRIANGLE_ASPECT if k == "triangle" else None) for k, v in _UNIT_POLYS.items()
}


def shape_half_extent(shape: str) -> tuple[float, float]:
    """Half width and half height of the shape's bounding box for extent 1."""
    if shape == "circle":
        return 0.5, 0.5
    pts = UNIT_POLYGONS[shape]
    return max(p[0] for p in pts), max(p[1] for p in pts)


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, tuple(COLOURS))
        _check("size", self.size, tuple(SIZES))
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"centre ({self.x}, {self.y}) outside [0, 1]^2")

    @property
    def extent(self) -> float:
        return SIZES[self.size]

    @property
    def half_extent(self) -> tuple[float, float]:
        hw, hh = shape_half_extent(self.shape)
        return hw * self.extent, hh * self.extent

    @property
    def radius(self) -> float:
        """Radius of the bounding circle around (x, y)."""
        if self.shape == "circle":
            return 0.5 * self.extent
        hw, hh = self.half_extent
        return math.hypot(hw, hh)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        hw, hh = self.half_extent
        return self.x - hw, self.y - hh, self.x + hw, self.y + hh

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeObject:
        return cls(str(d["shape"]), str(d["colour"]), str(d["size"]), float(d["x"]), float(d["y"]))


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(tuple(ShapeObject.from_dict(o) for o in d["objects"]))


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, gap: float = 0.05) -> bool:
    """Ground-truth "``a`` <relation> ``b``" with a clear margin (stricter than the scorer's rule).

    The bounding boxes must be separated by ``gap`` along the relation's axis and the centre offset
    along that axis must be at least twice the offset along the other axis.
    """
    _check("relation", relation, RELATIONS)
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    dx, dy = a.x - b.x, a.y - b.y
    if relation == "left of":
        return ax1 + gap <= bx0 and -dx >= 2 * abs(dy)
    if relation == "right of":
        return bx1 + gap <= ax0 and dx >= 2 * abs(dy)
    if relation == "above":
        return ay1 + gap <= by0 and -dy >= 2 * abs(dx)
    return by1 + gap <= ay0 and dy >= 2 * abs(dx)


def fits_in_scene(obj: ShapeObject, others: Sequence[ShapeObject]) -> bool:
    """Whether ``obj`` lies inside the canvas margins and clear of every object in ``others``."""
    x0, y0, x1, y1 = obj.bbox
    if x0 < EDGE_MARGIN or y0 < EDGE_MARGIN or x1 > 1 - EDGE_MARGIN or y1 > 1 - EDGE_MARGIN:
        return False
    return all(math.hypot(obj.x - o.x, obj.y - o.y) >= obj.radius + o.radius + GAP for o in others)


def sample_scene(
    rng: random.Random,
    n_objects: int,
    *,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
    fixed: Sequence[dict[str, Any] | None] | None = None,
    relation: tuple[int, str, int] | None = None,
    max_tries: int = 200,
) -> Scene:
    """Sample ``n_objects`` (1-4) non-overlapping objects at free positions.

    ``shapes`` / ``colours`` / ``sizes`` restrict the vocabulary objects are drawn from. ``fixed[k]``
    (a dict with any of ``shape``, ``colour``, ``size``, ``x``, ``y``) forces attributes of object ``k``.
    ``relation=(a, rel, b)`` requires ``relation_holds(objects[a], objects[b], rel)``. Attributes are
    redrawn on every restart, so a scene of four large objects is rare but any request that can be met
    is met within ``max_tries`` restarts (else ``RuntimeError``). Deterministic given ``rng``'s state.
    """
    if not 1 <= n_objects <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n_objects}")
    shapes = tuple(shapes or SHAPES)
    colours = tuple(colours or COLOURS)
    sizes = tuple(sizes or SIZES)
    for s in shapes:
        _check("shape", s, SHAPES)
    for c in colours:
        _check("colour", c, tuple(COLOURS))
    for z in sizes:
        _check("size", z, tuple(SIZES))
    fixed = list(fixed or [])
    if len(fixed) > n_objects:
        raise ValueError("more fixed entries than objects")
    fixed += [None] * (n_objects - len(fixed))
    if relation is not None:
        _check("relation", relation[1], RELATIONS)
        if not (0 <= relation[0] < n_objects and 0 <= relation[2] < n_objects) or relation[0] == relation[2]:
            raise ValueError(f"bad relation indices {relation}")

    for _ in range(max_tries):
        placed: list[ShapeObject] = []
        for k in range(n_objects):
            f = fixed[k] or {}
            shape = f.get("shape") or rng.choice(shapes)
            colour = f.get("colour") or rng.choice(colours)
            size = f.get("size") or rng.choice(sizes)
            hw, hh = shape_half_extent(shape)
            ext = SIZES[size]
            lo_x, hi_x = EDGE_MARGIN + hw * ext, 1 - EDGE_MARGIN - hw * ext
            lo_y, hi_y = EDGE_MARGIN + hh * ext, 1 - EDGE_MARGIN - hh * ext
            for _ in range(50):
                x = f["x"] if "x" in f else round(rng.uniform(lo_x, hi_x), 4)
                y = f["y"] if "y" in f else round(rng.uniform(lo_y, hi_y), 4)
                obj = ShapeObject(shape, colour, size, x, y)
                if not fits_in_scene(obj, placed):
                    continue
                if relation is not None and max(relation[0], relation[2]) == k:
                    cand = [*placed, obj]
                    if not relation_holds(cand[relation[0]], cand[relation[2]], relation[1]):
                        continue
                placed.append(obj)
                break
            else:
                break
        if len(placed) == n_objects:
            return Scene(tuple(placed))
    raise RuntimeError(f"could not place {n_objects} objects in {max_tries} tries")


def place_objects(
    rng: random.Random, specs: Sequence[dict[str, Any]], relation: tuple[int, str, int] | None = None
) -> Scene:
    """Place objects whose attributes are given by ``specs`` (missing ones are sampled), e.g.
    ``place_objects(rng, [{"shape": "circle"}, {"shape": "star"}], (0, "left of", 1))``."""
    return sample_scene(rng, len(specs), fixed=list(specs), relation=relation)
