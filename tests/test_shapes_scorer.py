"""ShapesWorld: deterministic sampling/rendering and a pixel-only scorer that agrees with ground truth."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from orion_mllm.data.shapes import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    ShapeObject,
    Spec,
    detect_objects,
    judge,
    judge_detections,
    mismatched_spec,
    render_scene,
    sample_scene,
    sample_spec_and_scene,
    score_images,
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _blur(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(1))


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = np.clip(a + rng.normal(0.0, 0.05, a.shape), 0.0, 1.0)
    return Image.fromarray((a * 255.0 + 0.5).astype(np.uint8))


def _shift(img: Image.Image, dx: int = 2, dy: int = 2) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=(255, 255, 255))


def _zoom(img: Image.Image, factor: float) -> Image.Image:
    """Scale the content about the centre: objects come out slightly too small or too large."""
    w, h = img.size
    cx, cy = w / 2, h / 2
    # Output pixel (x, y) samples input ((x - cx) / factor + cx, ...): an affine map with white fill.
    coeffs = (1 / factor, 0, cx - cx / factor, 0, 1 / factor, cy - cy / factor)
    return img.transform(
        img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor="white"
    )


def _pairs(seed: int, n: int) -> list[tuple[Spec, Scene]]:
    rng = random.Random(seed)
    return [sample_spec_and_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(n)]


def _accuracy(pairs, size: int, degrade=None) -> tuple[float, dict[str, float]]:
    per: dict[str, list[bool]] = {}
    for spec, scene in pairs:
        img = render_scene(scene, size)
        if degrade is not None:
            img = degrade(img)
        per.setdefault(spec.category, []).append(judge(spec, img))
    total = sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
    return total, {k: float(np.mean(v)) for k, v in per.items()}


# ------------------------------------------------------------------------------------ world / render


def test_vocabulary_sizes():
    assert len(SHAPES) >= 5 and {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLOURS) >= 7 and "white" not in COLOURS and "grey" not in COLOURS
    assert 2 <= len(SIZES) <= 3
    with pytest.raises(ValueError):
        ShapeObject("blob", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError):
        ShapeObject("circle", "mauve", "small", 0.5, 0.5)


def test_determinism_scene_and_png():
    for seed in range(5):
        a = sample_scene(random.Random(seed), 1 + seed % 4)
        b = sample_scene(random.Random(seed), 1 + seed % 4)
        assert a == b
        assert Scene.from_dict(json.loads(json.dumps(a.to_dict()))) == a
        for size in (32, 64, 252):
            assert _png(render_scene(a, size)) == _png(render_scene(b, size))
    assert sample_scene(random.Random(0), 3) != sample_scene(random.Random(1), 3)


def test_scenes_non_overlapping_and_inside():
    rng = random.Random(7)
    for i in range(200):
        scene = sample_scene(rng, 1 + i % 4)
        for k, o in enumerate(scene.objects):
            x0, y0, x1, y1 = o.bbox
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
            for p in scene.objects[k + 1 :]:
                assert np.hypot(o.x - p.x, o.y - p.y) > o.radius + p.radius


def test_fixed_attributes_and_relation():
    rng = random.Random(3)
    scene = sample_scene(
        rng, 2, fixed=[{"shape": "star", "colour": "blue", "size": "large"}, {"shape": "circle"}],
        relation=(0, "above", 1),
    )  # fmt: skip
    a, b = scene.objects
    assert (a.shape, a.colour, a.size, b.shape) == ("star", "blue", "large", "circle")
    assert a.y < b.y


def test_render_basic():
    scene = Scene((ShapeObject("circle", "red", "large", 0.5, 0.5),))
    for size in (32, 64, 128, 512):
        img = render_scene(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
        arr = np.asarray(img)
        assert tuple(arr[0, 0]) == (255, 255, 255)
        assert tuple(arr[size // 2, size // 2]) == COLOURS["red"]
        # anti-aliased: some edge pixels are neither white nor red
        assert len({tuple(p) for p in arr.reshape(-1, 3)}) > 2


def test_spec_roundtrip_and_prompt():
    spec = Spec("position", [ObjectSpec("circle"), ObjectSpec("star", "red")], (0, "left of", 1))
    assert Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.prompt() == "a photo of a circle left of a red star"
    assert Spec("counting", [ObjectSpec("cross", count=3)]).prompt() == "a photo of three crosses"
    with pytest.raises(ValueError):
        Spec("position", [ObjectSpec("circle")], (0, "near", 1))


# ------------------------------------------------------------------------------------------- scorer


def test_shape_and_colour_accuracy_per_kind_64px():
    rng = random.Random(11)
    hits_s: Counter = Counter()
    hits_c: Counter = Counter()
    n_s: Counter = Counter()
    n_c: Counter = Counter()
    for i in range(480):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        scene = sample_scene(rng, 1, fixed=[{"shape": shape, "colour": colour}])
        dets = detect_objects(render_scene(scene, 64))
        n_s[shape] += 1
        n_c[colour] += 1
        hits_s[shape] += len(dets) == 1 and dets[0].shape == shape
        hits_c[colour] += len(dets) == 1 and dets[0].colour == colour
    for k in SHAPES:
        assert hits_s[k] / n_s[k] >= 0.98, (k, hits_s[k], n_s[k])
    for k in COLOURS:
        assert hits_c[k] / n_c[k] >= 0.98, (k, hits_c[k], n_c[k])


def test_detection_geometry():
    scene = Scene(
        (
            ShapeObject("square", "blue", "medium", 0.3, 0.3),
            ShapeObject("triangle", "green", "large", 0.7, 0.7),
        )
    )
    dets = sorted(detect_objects(render_scene(scene, 128)), key=lambda d: d.cx)
    assert [(d.shape, d.colour) for d in dets] == [("square", "blue"), ("triangle", "green")]
    for d, o in zip(dets, scene.objects, strict=True):
        assert abs(d.cx - o.x) < 0.02 and abs(d.cy - o.y) < 0.02
        assert all(abs(u - v) < 0.02 for u, v in zip(d.bbox, o.bbox, strict=True))
    # numpy input, uint8 and float
    arr = np.asarray(render_scene(scene, 64))
    assert len(detect_objects(arr)) == 2 and len(detect_objects(arr / 255.0)) == 2


def test_ground_truth_accuracy_64px():
    acc, per = _accuracy(_pairs(0, 1200), 64)
    assert acc >= 0.99, per
    assert set(per) == set(CATEGORIES) and min(per.values()) >= 0.97, per


def test_ground_truth_accuracy_252px():
    acc, per = _accuracy(_pairs(1, 1000), 252)
    assert acc >= 0.99, per


def test_mismatched_specs_rejected():
    rng = random.Random(5)
    per: dict[str, list[bool]] = {}
    for spec, scene in _pairs(2, 600):
        bad = mismatched_spec(rng, spec, scene)
        per.setdefault(spec.category, []).append(judge(bad, render_scene(scene, 64)))
    for cat, v in per.items():
        assert np.mean(v) <= 0.05, (cat, np.mean(v))


def test_blank_and_noise_images_rejected():
    rng = np.random.default_rng(0)
    specs = [spec for spec, _ in _pairs(3, 120)]
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert detect_objects(blank) == []
    assert not any(judge(s, blank) for s in specs)
    hits = 0
    for i, spec in enumerate(specs):
        size = 64 if i % 2 else 128
        if i % 3 == 0:  # uniform RGB noise
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif i % 3 == 1:  # grey + Gaussian noise
            arr = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        else:  # white + strong Gaussian noise
            arr = np.clip(rng.normal(200, 60, (size, size, 3)), 0, 255).astype(np.uint8)
        hits += judge(spec, Image.fromarray(arr))
    assert hits / len(specs) <= 0.05


@pytest.mark.parametrize("name", ["blur", "noise", "shift", "smaller", "larger"])
def test_robustness_64px(name):
    nrng = np.random.default_rng(1)
    degrade = {
        "blur": _blur,
        "noise": lambda im: _noise(im, nrng),
        "shift": _shift,
        "smaller": lambda im: _zoom(im, 0.9),  # slightly wrong sizes, both ways
        "larger": lambda im: _zoom(im, 1.06),
    }[name]
    acc, per = _accuracy(_pairs(4, 1000), 64, degrade)
    assert acc >= 0.95, per


@pytest.mark.parametrize("name", ["blur", "noise", "shift"])
def test_robustness_252px(name):
    nrng = np.random.default_rng(2)
    degrade = {"blur": _blur, "noise": lambda im: _noise(im, nrng), "shift": _shift}[name]
    acc, per = _accuracy(_pairs(6, 150), 252, degrade)
    assert acc >= 0.95, per


def test_score_images_geneval_overall():
    pairs = _pairs(8, 60)
    imgs = [(spec, render_scene(scene, 64)) for spec, scene in pairs]
    res = score_images(imgs)
    assert set(CATEGORIES) <= set(res) and res["overall"] == pytest.approx(1.0)
    # half of one category wrong -> overall = mean of category accuracies
    rng = random.Random(0)
    mixed = []
    for i, (s, sc) in enumerate(pairs * 2):  # the second copy of each counting pair is mismatched
        wrong = s.category == "counting" and i >= len(pairs)
        mixed.append((mismatched_spec(rng, s, sc) if wrong else s, render_scene(sc, 64)))
    res = score_images(mixed)
    assert res["counting"] == pytest.approx(0.5)
    assert res["overall"] == pytest.approx(np.mean([res[c] for c in CATEGORIES]))


def test_judge_rules():
    def det(shape, colour, x, y, s=0.1):
        from orion_mllm.data.shapes import Detection

        return Detection(colour, shape, x, y, s * s, (x - s / 2, y - s / 2, x + s / 2, y + s / 2))

    dets = [det("circle", "red", 0.2, 0.5), det("circle", "blue", 0.5, 0.5), det("star", "red", 0.8, 0.5)]
    assert judge_detections(Spec("counting", [ObjectSpec("circle", count=2)]), dets)
    assert not judge_detections(Spec("counting", [ObjectSpec("circle", count=1)]), dets)
    assert judge_detections(Spec("two_objects", [ObjectSpec("circle"), ObjectSpec("star")]), dets)
    assert not judge_detections(Spec("colors", [ObjectSpec("circle", "red")]), dets)  # a blue one too
    assert judge_detections(Spec("colors", [ObjectSpec("star", "red")]), dets)
    assert judge_detections(
        Spec("color_attr", [ObjectSpec("circle", "blue"), ObjectSpec("star", "red")]), dets
    )
    pos = Spec("position", [ObjectSpec("circle"), ObjectSpec("star")], (0, "left of", 1))
    assert judge_detections(pos, dets)
    assert not judge_detections(Spec("position", pos.objects, (0, "right of", 1)), dets)
