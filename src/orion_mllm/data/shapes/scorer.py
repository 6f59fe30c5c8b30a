"""Pixel-only detection of ShapesWorld objects and GenEval-style judging of generated images.

Detection (no learned parts, numpy only):

1. Every pixel is explained as a mix of white and one palette colour, ``p = a * c + (1 - a) * white``
   (anti-aliasing and blur only move pixels along these lines). For each palette colour the mixing
   weight ``a`` and the distance of the pixel from the line are computed; the pixel takes the colour
   of the nearest line and is foreground when ``a >= 0.5`` and the distance is small.
2. A 3x3 majority filter cleans the foreground mask (noise), then connected components are labelled
   (4-connectivity, run-length union-find).
3. Components that are tiny, huge, touch the image border or are not dominated by one colour are
   dropped (this rejects noise images). The colour is the majority label of the component's core.
4. The shape comes from geometry: fill ratio of the bounding box, solidity (area over the convex hull
   of the pixel corners) and, for convex shapes with a half-filled box, whether the top half of the
   object is narrower than the bottom half (triangle, apex up) or not (diamond).

Judging follows GenEval (Ghosh et al., 2023): see :func:`judge`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .world import COLOURS, RELATIONS, SHAPES, SIZES, Scene, place_objects, sample_scene

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
POSITION_THRESHOLD = 0.1  # GenEval's margin, in units of the two objects' box dimensions

_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE_DEFICIT = 255.0 - np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)  # K x 3
_PALETTE_NORM2 = (_PALETTE_DEFICIT**2).sum(axis=1)  # K

MIN_AREA = 0.004  # components smaller than this fraction of the image are ignored
MAX_AREA = 0.35  # ... and larger ones too (no object covers more than ~0.15)
MIN_COLOUR_AGREEMENT = 0.6


@dataclass
class Detection:
    colour: str
    shape: str
    cx: float  # bounding-box centre, normalised to [0, 1]
    cy: float
    area: float  # pixel area as a fraction of the image
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1), normalised, x1/y1 exclusive
    features: dict[str, float] = field(default_factory=dict, repr=False)


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        arr = arr[..., :3].astype(np.float32)
        if arr.size and arr.max() <= 1.0 and np.issubdtype(np.asarray(image).dtype, np.floating):
            arr = arr * 255.0
    return arr


def classify_pixels(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: palette index of the nearest white->colour line, mixing weight, foreground mask."""
    d = 255.0 - arr.reshape(-1, 3)  # N x 3 deficit from white
    dot = d @ _PALETTE_DEFICIT.T  # N x K
    alpha = dot / _PALETTE_NORM2
    resid2 = np.maximum((d**2).sum(axis=1, keepdims=True) - dot**2 / _PALETTE_NORM2, 0.0)
    resid2 = np.where(alpha > 0.2, resid2, np.inf)
    best = resid2.argmin(axis=1)
    idx = np.arange(len(best))
    a = alpha[idx, best]
    r = np.sqrt(resid2[idx, best])
    tol = 0.35 * a * np.sqrt(_PALETTE_NORM2[best]) + 15.0
    fg = (a >= 0.5) & (r <= tol)
    h, w = arr.shape[:2]
    return best.reshape(h, w), a.reshape(h, w), fg.reshape(h, w)


def _majority3(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask.astype(np.uint8), 1)
    h, w = mask.shape
    count = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3))
    return count >= 5


def _label_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of ``mask`` as runs: (row, start, end, component id) arrays."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(rows, np.arange(h + 1))
    ss, es = starts.tolist(), ends.tolist()
    for y in range(1, h):
        i, i_end = int(row_start[y - 1]), int(row_start[y])
        j, j_end = int(row_start[y]), int(row_start[y + 1])
        while i < i_end and j < j_end:
            if ss[i] < es[j] and ss[j] < es[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if es[i] < es[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, comp = np.unique(roots, return_inverse=True)
    return rows, starts, ends, comp.reshape(-1)


def _hull_area(points: list[tuple[int, int]]) -> float:
    pts = sorted(set(points))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[int, int]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull))))


_N_BINS = 32


def _radial_harmonics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Fourier harmonics 3/4/5/8 of the polar radius profile, relative to the mean radius.

    ``h4_cos`` > 0 means the 4-fold extremes sit on the axes (diamond, cross), < 0 on the diagonals
    (square)."""
    dx, dy = x - x.mean(), y - y.mean()
    ang = np.arctan2(dy, dx)
    rad = np.hypot(dx, dy) + 0.5
    b = ((ang + np.pi) / (2 * np.pi) * _N_BINS).astype(np.int64) % _N_BINS
    prof = np.zeros(_N_BINS)
    np.maximum.at(prof, b, rad)
    if (prof == 0).any():  # tiny objects: fill empty bins from their neighbours
        good = np.nonzero(prof > 0)[0]
        idx = np.arange(_N_BINS)
        prof = np.interp(idx, good, prof[good], period=_N_BINS)
    theta = (np.arange(_N_BINS) + 0.5) / _N_BINS * 2 * np.pi - np.pi
    mean = prof.mean()
    out = {}
    for n in (3, 4, 5, 8):
        z = (prof * np.exp(-1j * n * theta)).mean() * 2 / mean
        out[f"h{n}"] = float(abs(z))
        if n == 4:
            out["h4_cos"] = float(z.real)
    return out


def classify_shape(f: dict[str, float]) -> str:
    """Shape name from geometric features: the dominant harmonic of the polar radius profile
    (3: triangle, 5: star, 4: square / diamond / cross, none: circle); the sign of the 4th harmonic
    separates square (corners on the diagonals) from diamond and cross, solidity separates those."""
    if f["h3"] >= 0.16 and f["h3"] >= max(f["h4"], f["h5"]):
        return "triangle"
    if f["h5"] >= 0.07 and f["h5"] >= f["h4"]:
        return "star"
    c = f["h4_cos"]
    if c <= -0.075:
        return "square"
    if c >= 0.08:
        return "cross" if c + (0.9 - f["solidity"]) >= 0.215 else "diamond"
    return "circle"


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Detect coloured shapes in an RGB image (PIL or HxWx3 array, uint8 or float in [0, 1])."""
    arr = _to_array(image)
    h, w = arr.shape[:2]
    labels, alpha, fg = classify_pixels(arr)
    fg = _majority3(fg)
    rows, starts, ends, comp = _label_runs(fg)
    if len(rows) == 0:
        return []
    n_comp = int(comp.max()) + 1
    lengths = ends - starts
    area = np.bincount(comp, weights=lengths, minlength=n_comp)
    # Colour votes over core pixels (alpha >= 0.7), falling back to all pixels of the component.
    lab_img = np.full((h, w), -1, dtype=np.int64)
    for r, s, e, c in zip(rows.tolist(), starts.tolist(), ends.tolist(), comp.tolist(), strict=True):
        lab_img[r, s:e] = c
    k = len(_COLOUR_NAMES)
    inside = lab_img >= 0
    votes_all = np.bincount(lab_img[inside] * k + labels[inside], minlength=n_comp * k).reshape(n_comp, k)
    core = inside & (alpha >= 0.7)
    votes_core = np.bincount(lab_img[core] * k + labels[core], minlength=n_comp * k).reshape(n_comp, k)

    dets: list[Detection] = []
    order = np.argsort(comp, kind="stable")
    bounds = np.searchsorted(comp[order], np.arange(n_comp + 1))
    for c in range(n_comp):
        frac = area[c] / (h * w)
        if frac < MIN_AREA or frac > MAX_AREA:
            continue
        sel = order[bounds[c] : bounds[c + 1]]
        rr, ss, ee = rows[sel], starts[sel], ends[sel]
        y0, y1, x0, x1 = int(rr.min()), int(rr.max()) + 1, int(ss.min()), int(ee.max())
        if x0 == 0 or y0 == 0 or x1 == w or y1 == h:
            continue  # touches the border: not a complete object (or a noise blob)
        votes = votes_core[c] if votes_core[c].sum() >= 0.3 * area[c] else votes_all[c]
        colour_idx = int(votes.argmax())
        if votes[colour_idx] < MIN_COLOUR_AGREEMENT * votes.sum():
            continue
        # Per-row extents and widths.
        bh, bw = y1 - y0, x1 - x0
        row_min = np.full(bh, w, dtype=np.int64)
        row_max = np.zeros(bh, dtype=np.int64)
        row_width = np.zeros(bh, dtype=np.float64)
        np.minimum.at(row_min, rr - y0, ss)
        np.maximum.at(row_max, rr - y0, ee)
        np.add.at(row_width, rr - y0, ee - ss)
        present = row_width > 0
        pts: list[tuple[int, int]] = []
        for yy in np.nonzero(present)[0].tolist():
            a, b = int(row_min[yy]), int(row_max[yy])
            pts += [(a, yy), (a, yy + 1), (b, yy), (b, yy + 1)]
        hull = _hull_area(pts)
        half = bh // 2
        top = row_width[:half].sum() if half else 0.0
        bottom = row_width[bh - half :].sum() if half else 0.0
        # Polar profile: max radius (from the centroid) of the component's pixels per angle bin.
        yy_, xx_ = np.nonzero(lab_img[y0:y1, x0:x1] == c)
        feats = _radial_harmonics(xx_ + 0.5, yy_ + 0.5)
        feats |= {
            "fill": float(area[c] / (bw * bh)),
            "solidity": float(area[c] / hull) if hull > 0 else 1.0,
            "top_bottom": float(top / bottom) if bottom > 0 else 1.0,
            "aspect": bw / bh,
        }
        dets.append(
            Detection(
                colour=_COLOUR_NAMES[colour_idx],
                shape=classify_shape(feats),
                cx=(x0 + x1) / 2 / w,
                cy=(y0 + y1) / 2 / h,
                area=float(frac),
                bbox=(x0 / w, y0 / h, x1 / w, y1 / h),
                features=feats,
            )
        )
    return dets


# --------------------------------------------------------------------------------------------- specs


@dataclass
class ObjectSpec:
    shape: str
    colour: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.count < 1:
            raise ValueError("count must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectSpec:
        return cls(d["shape"], d.get("colour"), int(d.get("count", 1)))


_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass
class Spec:
    category: str
    objects: list[ObjectSpec]
    relation: tuple[int, str, int] | None = None  # (a, "left of" | ..., b): objects[a] rel objects[b]

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")
        if self.relation is not None:
            a, rel, b = self.relation
            if rel not in RELATIONS or not (0 <= a < len(self.objects) and 0 <= b < len(self.objects)):
                raise ValueError(f"bad relation {self.relation}")
            self.relation = (int(a), rel, int(b))

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "objects": [o.to_dict() for o in self.objects],
            "relation": list(self.relation) if self.relation is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        rel = d.get("relation")
        return cls(
            d["category"],
            [ObjectSpec.from_dict(o) for o in d["objects"]],
            (int(rel[0]), str(rel[1]), int(rel[2])) if rel is not None else None,
        )

    def prompt(self) -> str:
        """A GenEval-style prompt, e.g. "a photo of a red circle and a blue star"."""

        def phrase(o: ObjectSpec) -> str:
            noun = o.shape + ("es" if o.shape == "cross" else "s") if o.count > 1 else o.shape
            words = [o.colour, noun] if o.colour else [noun]
            if o.count > 1:
                return " ".join([_NUMBER_WORDS.get(o.count, str(o.count)), *words])
            art = "an" if words[0][0] in "aeiou" else "a"
            return " ".join([art, *words])

        if self.relation is not None:
            a, rel, b = self.relation
            return f"a photo of {phrase(self.objects[a])} {rel} {phrase(self.objects[b])}"
        return "a photo of " + " and ".join(phrase(o) for o in self.objects)


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` relative to ``b`` (GenEval's rule on box centres and dimensions)."""
    off = np.array([a.cx - b.cx, a.cy - b.cy])
    dims = np.array(
        [a.bbox[2] - a.bbox[0] + b.bbox[2] - b.bbox[0], a.bbox[3] - a.bbox[1] + b.bbox[3] - b.bbox[1]]
    )
    revised = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0.0) * np.sign(off)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(off)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _matches(o: ObjectSpec, dets: Sequence[Detection]) -> list[Detection]:
    return [d for d in dets if d.shape == o.shape and (o.colour is None or d.colour == o.colour)]


def judge_detections(spec: Spec, dets: Sequence[Detection]) -> bool:
    """GenEval rules on detections: ``counting`` needs exactly ``count`` matches, other categories at
    least ``count``; ``colors`` also needs every detected object of that shape to have the colour;
    ``position`` needs the relation to hold for every pair of matches."""
    found = []
    for o in spec.objects:
        m = _matches(o, dets)
        if len(m) < o.count or (spec.category == "counting" and len(m) != o.count):
            return False
        other_colour = any(d.colour != o.colour for d in dets if d.shape == o.shape)
        if spec.category == "colors" and o.colour is not None and other_colour:
            return False
        found.append(m)
    if spec.relation is not None:
        a, rel, b = spec.relation
        for da in found[a]:
            for db in found[b]:
                if da is db or rel not in relative_position(da, db):
                    return False
    return True


def judge(spec: Spec, image: Image.Image | np.ndarray) -> bool:
    """Whether ``image`` satisfies ``spec`` (pixels only)."""
    return judge_detections(spec, detect_objects(image))


def score_images(pairs: Iterable[tuple[Spec, Image.Image | np.ndarray]]) -> dict[str, float]:
    """Per-category accuracy (categories with samples only), ``overall`` = mean of those, ``n`` = total."""
    return score_judgments((spec, judge(spec, image)) for spec, image in pairs)


def score_judgments(judged: Iterable[tuple[Spec, bool]]) -> dict[str, float]:
    """:func:`score_images` from verdicts already made (spec, judged right)."""
    hits: dict[str, list[bool]] = {}
    for spec, right in judged:
        hits.setdefault(spec.category, []).append(bool(right))
    out: dict[str, float] = {c: float(np.mean(hits[c])) for c in CATEGORIES if c in hits}
    out["overall"] = float(np.mean(list(out.values()))) if out else 0.0
    out["n"] = float(sum(len(v) for v in hits.values()))
    return out


# ------------------------------------------------------------------------------------------ sampling


def sample_spec_and_scene(rng: random.Random, category: str) -> tuple[Spec, Scene]:
    """A (Spec, Scene) pair of ``category`` such that the rendered scene satisfies the spec."""
    shapes = list(SHAPES)
    if category == "single_object":
        scene = sample_scene(rng, 1)
        return Spec(category, [ObjectSpec(scene.objects[0].shape)]), scene
    if category == "colors":
        scene = sample_scene(rng, 1)
        o = scene.objects[0]
        return Spec(category, [ObjectSpec(o.shape, o.colour)]), scene
    if category == "two_objects":
        a, b = rng.sample(shapes, 2)
        scene = place_objects(rng, [{"shape": a}, {"shape": b}])
        return Spec(category, [ObjectSpec(a), ObjectSpec(b)]), scene
    if category == "color_attr":
        a, b = rng.sample(shapes, 2)
        ca, cb = rng.sample(list(COLOURS), 2)
        scene = place_objects(rng, [{"shape": a, "colour": ca}, {"shape": b, "colour": cb}])
        return Spec(category, [ObjectSpec(a, ca), ObjectSpec(b, cb)]), scene
    if category == "position":
        a, b = rng.sample(shapes, 2)
        rel = rng.choice(RELATIONS)
        scene = place_objects(rng, [{"shape": a}, {"shape": b}], (0, rel, 1))
        return Spec(category, [ObjectSpec(a), ObjectSpec(b)], (0, rel, 1)), scene
    if category == "counting":
        shape = rng.choice(shapes)
        count = rng.choice((2, 3, 4))
        n_distract = rng.choice((0, 1)) if count < 4 else 0
        others = [s for s in shapes if s != shape]
        fixed: list[dict[str, Any] | None] = [{"shape": shape}] * count
        fixed += [{"shape": rng.choice(others)} for _ in range(n_distract)]
        n = count + n_distract
        sizes = list(SIZES) if n <= 2 else [s for s in SIZES if SIZES[s] <= 0.3]
        scene = sample_scene(rng, n, fixed=fixed, sizes=sizes)
        return Spec(category, [ObjectSpec(shape, count=count)]), scene
    raise ValueError(f"unknown category {category!r}")


_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def mismatched_spec(rng: random.Random, spec: Spec, scene: Scene) -> Spec:
    """A spec of the same category that ``scene`` does NOT satisfy (for negatives / judge tests):
    absent shape (single/two objects), count off by one, other colour, swapped colours, flipped
    relation."""
    present = {o.shape for o in scene.objects}
    absent = [s for s in SHAPES if s not in present]
    objs = [ObjectSpec(o.shape, o.colour, o.count) for o in spec.objects]
    cat = spec.category
    if cat in ("single_object", "two_objects"):
        k = rng.randrange(len(objs))
        objs[k] = ObjectSpec(rng.choice(absent), objs[k].colour, objs[k].count)
    elif cat == "counting":
        c = objs[0].count
        objs[0] = ObjectSpec(objs[0].shape, objs[0].colour, c + rng.choice((-1, 1)) if c > 1 else c + 1)
    elif cat == "colors":
        objs[0] = ObjectSpec(objs[0].shape, rng.choice([c for c in COLOURS if c != objs[0].colour]))
    elif cat == "color_attr":
        objs = [ObjectSpec(objs[0].shape, objs[1].colour), ObjectSpec(objs[1].shape, objs[0].colour)]
    elif cat == "position":
        assert spec.relation is not None
        a, rel, b = spec.relation
        return Spec(cat, objs, (a, _FLIP[rel], b))
    return Spec(cat, objs, spec.relation)


__all__ = [
    "CATEGORIES",
    "Detection",
    "ObjectSpec",
    "Spec",
    "classify_shape",
    "detect_objects",
    "judge",
    "judge_detections",
    "mismatched_spec",
    "relative_position",
    "sample_spec_and_scene",
    "score_images",
    "score_judgments",
]
