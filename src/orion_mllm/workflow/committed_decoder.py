"""The diffusion decoder committed beside a committed base (``bases/PRESET/decoder``), so the quickstart
does not train it again.

The paper renders with Nexus-Gen's released decoder and trains none; the ShapesWorld presets have none
released, so the quickstart trains one on the committed base's frozen tokens: the same minutes on every
run, for the same result. A *committed decoder* is that run, produced once by ``python
scripts/build_decoder.py --preset PRESET`` and kept under ``bases/PRESET/decoder/``:

- ``final/``: ``decoder_config.json`` and ``network.safetensors``, every trained weight but the coarse
  map (``OrionDecoder.save_network``). The coarse map (a ridge fit from all of an image's tokens to its
  pixels, 118 MB at the tiny preset's rank) is a closed-form function of the recipe's images and the
  base's tower, so the quickstart fits it again (~1-2 min) instead of keeping it in git;
- ``run.json``, ``recipe.yaml``: the trainer's own records of the run;
- ``provenance.json``: the command, the resolved recipe, the SHA-256 of the base model it was trained on,
  the seed, the git commit, the wall time and the machine.

``orion quickstart`` uses it for its ``decoder`` step when it also uses the committed base, the base is the
one the decoder was trained on (by hash) and the tree's decoder recipe (plus the quickstart's overrides,
``data_root`` aside) equals the recorded one; otherwise it trains the decoder, saying why.
``--from-scratch`` trains both.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from orion_mllm.train.recipe import DecoderRecipe, load_recipe
from orion_mllm.workflow.committed_base import (
    MAX_BYTES,
    PROVENANCE,
    BaseMismatch,
    bases_root,
    folder_bytes,
    git_commit,
    install_base,
    machine,
    read_provenance,
    recipe_fingerprint,
    repo_relative,
)
from orion_mllm.workflow.train_stage import train_stage

DECODER_DIR = "decoder"  # under bases/PRESET
BASE_WEIGHTS = "model.safetensors"


def committed_decoder(preset: str, root: Path | None = None) -> Path | None:
    """``bases/PRESET/decoder`` if a decoder is committed for ``preset``."""
    folder = (root or bases_root()) / preset / DECODER_DIR
    return folder if (folder / PROVENANCE).is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_decoder(folder: Path, recipe_file: Path, overrides: list[str], base_model: Path) -> dict[str, Any]:
    """The committed decoder's provenance if it was trained by ``recipe_file`` + ``overrides`` on the
    tokens of the base model in ``base_model`` (a model directory); else :class:`BaseMismatch` saying
    what differs."""
    from orion_mllm.decoder.model import NETWORK_WEIGHTS
    from orion_mllm.train.trainer import recipe_changes  # the trainer (torch) only when checking

    provenance = read_provenance(folder)
    recorded = provenance.get("recipe")
    keys = ["recipe"] if not isinstance(recorded, dict) else []
    if not keys:
        keys = recipe_changes(recorded, recipe_fingerprint(recipe_file, overrides), DecoderRecipe, ignore=())
    if keys:
        raise BaseMismatch(
            f"{folder} was trained with another recipe than {recipe_file} (differs at {', '.join(keys[:4])})"
        )
    weights = base_model / BASE_WEIGHTS
    if not weights.is_file() or provenance.get("base_sha256") != file_sha256(weights):
        raise BaseMismatch(f"{folder} was trained on the tokens of another base than {base_model}")
    if not (folder / "final" / NETWORK_WEIGHTS).is_file():
        raise BaseMismatch(f"{folder}/final/{NETWORK_WEIGHTS} missing")
    return provenance


def build_decoder(
    recipe_file: Path, base: Path, target: Path, work_dir: Path, overrides: list[str] | None = None,
    command: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Train the decoder of ``recipe_file`` + ``overrides`` on the tokens of the committed base in
    ``base`` (a ``bases/PRESET`` folder) in ``work_dir``, as the quickstart's ``decoder`` step would,
    and keep it as a committed decoder in ``target`` (replaced only once the new one is complete).
    Returns the new provenance."""
    from orion_mllm.decoder.model import DECODER_CONFIG, NETWORK_WEIGHTS, OrionDecoder

    overrides = list(overrides or [])
    recipe = load_recipe(recipe_file, overrides)
    if not isinstance(recipe, DecoderRecipe):
        raise ValueError(f"{recipe_file}: stage {recipe.stage!r}, a committed decoder is a decoder run")
    if recipe.encoder != "previous":
        raise ValueError(
            f"{recipe_file}: encoder {recipe.encoder!r}; a committed decoder reads the base's tokens"
        )
    if recipe.data_root is not None and not any(o.startswith("data_root=") for o in overrides):
        overrides.append(f"data_root={work_dir / 'data' / Path(recipe.data_root).name}")
    base_run = work_dir / "stage0_base"
    if not (base_run / "run.json").is_file():
        install_base(base, base_run)  # the decoder's `encoder: previous` finds it as its finished sibling
    base_sha = file_sha256(base_run / "final" / BASE_WEIGHTS)
    if base_sha != file_sha256(base / "final" / BASE_WEIGHTS):
        raise ValueError(f"{base_run}: holds another base than {base}; remove it or choose another --work")
    t0 = time.time()
    final = train_stage(recipe_file, work_dir / DECODER_DIR, overrides)
    seconds = time.time() - t0
    run_dir = final.parent
    run = json.loads((run_dir / "run.json").read_text())
    provenance = {
        "command": command,
        "recipe_file": repo_relative(recipe_file),
        "recipe": recipe_fingerprint(recipe_file, overrides),
        "base": repo_relative(base),
        "base_sha256": base_sha,
        "seed": recipe.train.seed,
        "steps": run.get("steps"),
        "git_commit": git_commit(),
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(seconds, 1),
        "machine": machine(),
    }
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # before measuring: a crashed build's copy is not kept
    # The budget covers all the weights kept for a preset: the base and its decoder.
    others = folder_bytes(target.parent) - (folder_bytes(target) if target.is_dir() else 0)
    (tmp / "final").mkdir(parents=True)
    OrionDecoder.from_pretrained(final).save_network(tmp / "final" / NETWORK_WEIGHTS)
    shutil.copy2(final / DECODER_CONFIG, tmp / "final" / DECODER_CONFIG)
    for name in ("run.json", "recipe.yaml"):
        shutil.copy2(run_dir / name, tmp / name)
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    size = others + folder_bytes(tmp)
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        raise ValueError(
            f"{target.parent}: {size / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB kept in git"
        )
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return provenance


__all__ = ["DECODER_DIR", "build_decoder", "check_decoder", "committed_decoder", "file_sha256"]
