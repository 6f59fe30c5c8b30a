"""``shapes-gen``: a fixed GenEval-style prompt set over ShapesWorld, written and scored in GenEval's layout.

Layout (as GenEval's own generation scripts write it)::

    <outdir>/<index>/metadata.jsonl      one JSON line: tag, include, prompt (+ our exact "spec")
    <outdir>/<index>/samples/<k>.png     the k-th image generated for that prompt

``include`` follows GenEval's metadata (``class``, ``count``, ``color``, ``position: [relation,
index]``); scoring prefers our ``spec`` and falls back to converting ``include``, so folders written
by other tools in GenEval's format can be scored too. Scores: per-category accuracy over all
samples, ``overall`` = mean of the six category accuracies (GenEval's definition).

``--oracle`` renders the ground-truth scene for every prompt: the scorer's self-check on its own
world (it should be ~1.0).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from orion_mllm.data.shapes.render import render_scene
from orion_mllm.data.shapes.scorer import CATEGORIES, ObjectSpec, Spec, sample_spec_and_scene, score_images
from orion_mllm.data.shapes.world import Scene
from orion_mllm.images import ImageLoadError, load_image

# GenEval spells one tag differently from our category name.
GENEVAL_TAGS = {"two_objects": "two_object"}
FROM_GENEVAL_TAG = {v: k for k, v in GENEVAL_TAGS.items()}
PROMPTS_PER_CATEGORY = 92  # 6 x 92 = 552 prompts (GenEval has 553)


@dataclass(frozen=True)
class GenPrompt:
    index: int
    spec: Spec
    scene: Scene  # a scene satisfying the spec (the oracle's answer)

    @property
    def prompt(self) -> str:
        return self.spec.prompt()

    def metadata(self) -> dict[str, Any]:
        include = []
        for o in self.spec.objects:
            item: dict[str, Any] = {"class": o.shape, "count": o.count}
            if o.colour:
                item["color"] = o.colour
            include.append(item)
        if self.spec.relation is not None:
            a, rel, b = self.spec.relation
            # GenEval: include[a]["position"] = [relation, b] means object a is `relation` object b.
            include[a]["position"] = [rel, b]
        meta = {
            "tag": GENEVAL_TAGS.get(self.spec.category, self.spec.category),
            "include": include,
            "prompt": self.prompt,
            "spec": self.spec.to_dict(),
        }
        if self.spec.category == "counting":
            o = self.spec.objects[0]
            meta["exclude"] = [{"class": o.shape, "count": o.count + 1}]
        return meta


def prompt_set(seed: int = 0, per_category: int = PROMPTS_PER_CATEGORY) -> list[GenPrompt]:
    """The fixed prompt set: ``per_category`` prompts for each of the six categories, fixed by ``seed``."""
    rng = random.Random(f"shapes-gen/{seed}")
    prompts = []
    for category in CATEGORIES:
        for _ in range(per_category):
            spec, scene = sample_spec_and_scene(rng, category)
            prompts.append(GenPrompt(len(prompts), spec, scene))
    return prompts


def write_metadata(path: str | Path, *, seed: int = 0) -> int:
    """The prompt set as a GenEval metadata file (one JSON line per prompt, in index order), for
    ``orion eval geneval --metadata``; each line is the ``metadata.jsonl`` shapes-gen writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = prompt_set(seed)
    path.write_text("".join(json.dumps(p.metadata(), sort_keys=True) + "\n" for p in prompts))
    return len(prompts)


def spec_from_metadata(meta: dict[str, Any], where: str = "metadata") -> Spec:
    """Our ``spec`` when present, else GenEval's ``tag`` + ``include`` converted."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    try:
        if "spec" in meta:
            return Spec.from_dict(meta["spec"])
        objects = [ObjectSpec(i["class"], i.get("color"), int(i.get("count", 1))) for i in meta["include"]]
        relation = None
        for a, item in enumerate(meta["include"]):
            if "position" in item:
                rel, b = item["position"]
                relation = (a, rel, int(b))
        return Spec(FROM_GENEVAL_TAG.get(meta["tag"], meta["tag"]), objects, relation)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: cannot read a GenEval spec ({err})") from err


def write_oracle(outdir: str | Path, *, size: int = 64, seed: int = 0, samples: int = 1) -> int:
    """Write the prompt set with ground-truth renders in GenEval's layout; returns the prompt count."""
    if samples < 1:
        raise ValueError(f"samples={samples}: need at least one image per prompt")
    outdir = Path(outdir)
    prompts = prompt_set(seed)
    for p in tqdm(prompts, desc="oracle renders"):
        folder = outdir / f"{p.index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(p.metadata(), sort_keys=True) + "\n")
        image = render_scene(p.scene, size)
        for k in range(samples):
            image.save(folder / "samples" / f"{k:04d}.png")
    return len(prompts)


def iter_layout(outdir: str | Path) -> Iterator[tuple[Spec, Path]]:
    """(spec, image path) for every sample under a GenEval-layout folder."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise FileNotFoundError(f"{outdir}: not a folder")
    folders = sorted(p for p in outdir.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{outdir}: no <index>/metadata.jsonl folders found (GenEval layout expected)")
    for folder in folders:
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            raise ValueError(f"{folder}: metadata.jsonl is missing")
        try:
            meta = json.loads(meta_file.read_text().splitlines()[0])
        except (json.JSONDecodeError, IndexError) as err:
            raise ValueError(f"{meta_file}: not a JSON line ({err})") from err
        spec = spec_from_metadata(meta, str(meta_file))
        samples = sorted((folder / "samples").glob("*.png"))
        if not samples:
            raise ValueError(f"{folder}/samples: no PNG images")
        for path in samples:
            yield spec, path


def score_folder(outdir: str | Path, *, progress: bool = True) -> dict[str, float]:
    """Per-category accuracy and ``overall`` (mean of categories) for a GenEval-layout folder."""

    def pairs():
        for spec, path in tqdm(list(iter_layout(outdir)), desc="scoring", disable=not progress):
            try:
                yield spec, load_image(path)
            except ImageLoadError as err:
                raise ValueError(str(err)) from err

    result = score_images(pairs())  # the scorer's own per-category / overall rule
    result["samples"] = int(result.pop("n"))
    return result
