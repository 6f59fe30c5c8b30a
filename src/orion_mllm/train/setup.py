"""Where a stage starts from: its initial weights, its KL teacher, its data, its run directory.

- ``model.init`` is ``preset:NAME`` (random weights of a preset), a Qwen2.5-VL directory, an ORION
  directory, or ``previous``: the exported model of the finished run of the previous stage
  (base -> warmup -> pretrain -> sft) found next to this run's directory.
- The KL teacher is the original base model ORION training started from (paper 3.2), not the
  previous stage's output. Stage 1 records its init as the teacher in ``run.json``; later stages
  inherit it from the run that produced their init, unless the recipe names one (``teacher=PATH``).
- The model's image resolutions come from the recipe's ``resolution`` section.
- Small-scale recipes generate their ShapesWorld data into ``data_root`` when it is missing. A folder
  that is there is used only if its ``meta.json`` records the recipe's ``shapes_data`` settings;
  otherwise the run is refused with a one-line error (never regenerated over, never trained on
  quietly): set ``data_root=NEWDIR`` to generate the recipe's data there, delete the folder, or set
  ``shapes_data=null`` to train on the folder as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orion_mllm.data.shapes.world import Scene
from orion_mllm.images import ImageSpec
from orion_mllm.model.orion import ORION_CONFIG_NAME, OrionModel
from orion_mllm.train.recipe import Recipe
from orion_mllm.train.tower_pretrain import TowerPretrainResult, TowerPretrainSettings, pretrain_tower

STAGE_ORDER = ("base", "warmup", "pretrain", "sft")
RUN_INFO = "run.json"
FINAL_MODEL = "final"


class SetupError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


def read_run_info(run_dir: str | Path) -> dict[str, Any] | None:
    f = Path(run_dir) / RUN_INFO
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise SetupError(f"{f}: not valid JSON ({err})") from None


def write_run_info(run_dir: str | Path, info: dict[str, Any]) -> None:
    f = Path(run_dir) / RUN_INFO
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(f)


def previous_stage(stage: str) -> str:
    i = STAGE_ORDER.index(stage)
    if i == 0:
        raise SetupError("stage base has no previous stage: set model.init=preset:NAME or a directory")
    return STAGE_ORDER[i - 1]


def find_previous_run(run_dir: Path, stage: str) -> Path:
    """The finished run of the stage before ``stage`` among ``run_dir``'s siblings."""
    want = previous_stage(stage)
    parent = run_dir.parent
    found = []
    if parent.is_dir():
        for d in sorted(parent.iterdir()):
            info = read_run_info(d) if d.is_dir() and d != run_dir else None
            if info and info.get("stage") == want:
                found.append((d, info))
    finished = [d for d, info in found if info.get("status") == "finished" and (d / FINAL_MODEL).is_dir()]
    if len(finished) == 1:
        return finished[0]
    if not found:
        raise SetupError(
            f"model.init=previous: no {want!r} run next to {run_dir} (looked in {parent}); "
            f"run the {want} stage with --output {parent}/NAME first, or set model.init=DIR"
        )
    if not finished:
        raise SetupError(
            f"model.init=previous: the {want!r} run {found[0][0]} has not finished; "
            "re-run its command to resume it first"
        )
    names = ", ".join(str(d) for d in finished)
    raise SetupError(f"model.init=previous: several finished {want!r} runs ({names}); set model.init=DIR")


def resolve_init(recipe: Recipe, run_dir: Path) -> str:
    """``preset:NAME`` or an absolute model directory."""
    init = recipe.model.init
    if init == "previous":
        return str((find_previous_run(run_dir, recipe.stage) / FINAL_MODEL).resolve())
    if init.startswith("preset:"):
        return init
    path = Path(init).expanduser()
    if not (path / "config.json").is_file():
        raise SetupError(
            f"model.init={init!r}: not a model directory (no config.json); "
            "give preset:NAME, a local Qwen2.5-VL/ORION directory, or 'previous'"
        )
    return str(path.resolve())


def resolve_teacher(recipe: Recipe, init: str) -> str:
    """The original base model: recorded for every stage, loaded only when the KL weight is > 0."""
    if recipe.teacher:
        if recipe.teacher.startswith("preset:"):
            return recipe.teacher
        path = Path(recipe.teacher).expanduser()
        if not (path / "config.json").is_file():
            raise SetupError(f"teacher={recipe.teacher!r}: not a model directory (no config.json)")
        return str(path.resolve())
    if recipe.stage in ("base", "warmup"):
        return init  # ORION training starts here: this *is* the base model
    if init.startswith("preset:"):
        raise SetupError(
            f"stage {recipe.stage} starts from {init}: which base model is the KL teacher? set teacher=PATH"
        )
    info = read_run_info(Path(init).parent)
    if info and info.get("teacher"):
        return info["teacher"]
    raise SetupError(
        f"stage {recipe.stage}: cannot tell the original base model of {init} (no run.json with a "
        "'teacher' next to it); set teacher=PATH to the model stage 1 started from"
    )


def recipe_image_spec(recipe: Recipe, processor) -> ImageSpec:
    ip = processor.image_processor
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    factor = patch * merge
    res = recipe.resolution
    gen = res.gen_max_long_side
    if gen % factor:
        raise SetupError(
            f"resolution.gen_max_long_side={gen}: must be a multiple of patch x merge = {factor}"
        )
    und_min = res.und_min_long_side or 2 * factor
    und_max = res.und_max_long_side or max(und_min, 1024 // factor * factor)
    return ImageSpec(
        patch_size=patch,
        merge_size=merge,
        gen_image_size=gen,
        und_min_long_side=max(factor, und_min // factor * factor),
        und_max_long_side=max(factor, und_max // factor * factor),
    )


def build_model(recipe: Recipe, init: str) -> OrionModel:
    """The student in fp32 (bf16 compute comes from autocast / FSDP mixed precision)."""
    m = recipe.model
    common = {"attn_implementation": m.attn_implementation, "dtype": torch.float32}
    if init.startswith("preset:"):
        model = OrionModel.from_preset(
            init.removeprefix("preset:"), head=m.head, mlp_ratio=m.mlp_ratio, seed=recipe.train.seed, **common
        )
    elif (Path(init) / ORION_CONFIG_NAME).is_file():
        model = OrionModel.from_pretrained(init, **common)
        saved = model.config.head.name
        if saved != m.head:
            raise SetupError(
                f"model.head={m.head!r} but {init} holds a {saved!r} head; set model.head={saved}"
            )
    else:
        model = OrionModel.from_qwen(
            init, head=m.head, mlp_ratio=m.mlp_ratio, seed=recipe.train.seed, **common
        )
    model.config.image_spec = recipe_image_spec(recipe, model.processor)
    if m.source_skip:
        model.enable_source_skip()
    elif model.source_skip is not None:
        raise SetupError(
            f"model.source_skip=false but {init} has an edit-source skip; set model.source_skip=true"
        )
    return model


def standardize_tower(model: OrionModel, recipe: Recipe) -> None:
    """``model.standardize_tokens_images`` > 0: the data-dependent tower initialisation of stage 0,
    on the first images of the recipe's first data entry (deterministic, so a resume redoes it
    identically before loading the checkpoint)."""
    from orion_mllm.data.records import encode_record
    from orion_mllm.data.sources import open_dataset

    want = recipe.model.standardize_tokens_images
    if not want:
        return
    builder = model.sequence_builder()
    source = open_dataset(recipe.data[0], recipe.data_root, seed=recipe.train.seed)
    samples = []
    for i in range(len(source)):
        if len(samples) >= want:
            break
        try:
            enc = encode_record(builder, source.get(i).record, record_id=str(i))
        except (ValueError, OSError):  # an unreadable record or image: training skips it too
            continue
        if enc.pixel_values is not None:
            samples.append((enc.pixel_values, enc.image_grid_thw))
    if not samples:
        raise SetupError(f"model.standardize_tokens_images: no images in data entry {recipe.data[0].name!r}")
    model.standardize_visual_tokens(samples, recipe.model.standardize_tokens_scale)


def recipe_scenes(recipe: Recipe) -> list[Scene]:
    """The ShapesWorld scenes of the recipe's data entries (records without a ``scene`` are skipped)."""
    from orion_mllm.data.sources import open_dataset

    scenes = []
    for entry in recipe.data:
        source = open_dataset(entry, recipe.data_root, seed=recipe.train.seed)
        for i in range(len(source)):
            scene = source.get(i).record.get("scene")
            if isinstance(scene, dict):
                try:
                    scenes.append(Scene.from_dict(scene))
                except (KeyError, TypeError, ValueError) as err:
                    raise SetupError(f"data entry {entry.name!r}, record {i}: bad scene: {err}") from err
    return scenes


def pretrain_tower_for_recipe(
    model: OrionModel, recipe: Recipe, log: Callable[[str], None] | None = None
) -> TowerPretrainResult | None:
    """``model.tower_pretrain``: the dense tower pre-training of stage 0 (train/tower_pretrain.py) on the
    recipe's scenes; deterministic for a given seed. None when the recipe does not ask for it."""
    section = recipe.model.tower_pretrain
    if section is None:
        return None
    scenes = recipe_scenes(recipe)
    if not scenes:
        raise SetupError("model.tower_pretrain: the recipe's data has no ShapesWorld records with a 'scene'")
    settings = TowerPretrainSettings(
        steps=section.steps,
        batch_size=section.batch_size,
        lr=section.lr,
        recon_weight=section.recon_weight,
        position_weight=section.position_weight,
        seed=recipe.train.seed,
    )
    return pretrain_tower(model, scenes, settings, log=log)


def apply_trainable(model: OrionModel, recipe: Recipe) -> None:
    """Freeze per stage: vision tower/merger, LLM (embeddings, layers, norm, LM head), vision head."""
    t = recipe.trainable
    model.requires_grad_(False)
    model.backbone.model.visual.requires_grad_(t.vision_tower)
    if t.merger:
        model.backbone.model.visual.merger.requires_grad_(True)
    model.backbone.model.language_model.requires_grad_(t.llm)
    model.backbone.lm_head.requires_grad_(t.llm)
    model.vision_head.requires_grad_(t.head)
    if model.source_skip is not None:  # it feeds the LLM's input, so it trains with the LLM
        model.source_skip.requires_grad_(t.llm)


def check_shapes_settings(root: Path, want: dict[str, Any]) -> None:
    """Refuse a ShapesWorld folder not written with the settings ``want`` (a recipe's ``shapes_data``)."""
    from orion_mllm.data.shapes.datasets import recorded_settings
    from orion_mllm.data.templates import ALL_TEMPLATES

    fix = (
        f"set data_root=NEWDIR to generate the recipe's data there, delete {root}, "
        "or set shapes_data=null to train on it as it is"
    )
    try:
        meta = json.loads((root / "meta.json").read_text())
    except json.JSONDecodeError as err:
        raise SetupError(f"data_root={root}: meta.json is not valid JSON ({err}); {fix}") from None
    have = recorded_settings(meta)
    if have is None:
        raise SetupError(
            f"data_root={root} holds ShapesWorld data without recorded generator settings (an older "
            f"version wrote it), not the recipe's shapes_data {want}: {fix}"
        )
    diff = [f"{k} {have.get(k)!r} vs recipe {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise SetupError(
            f"data_root={root} holds ShapesWorld data written with other settings ({', '.join(diff)}): {fix}"
        )
    # The request templates are part of the generator, not of the settings: a folder written with
    # another set would train on other wordings (and the report would not say so).
    if meta.get("num_templates") != len(ALL_TEMPLATES):
        raise SetupError(
            f"data_root={root} holds ShapesWorld data written with {meta.get('num_templates')} request "
            f"templates, this version has {len(ALL_TEMPLATES)}: {fix}"
        )


def ensure_shapes_data(recipe: Recipe, *, progress: bool = True) -> Path | None:
    """Write the recipe's ShapesWorld data to ``data_root`` if it is not there yet (rank 0 only).

    An existing folder must have been written with the recipe's ``shapes_data``: else ``SetupError``."""
    if recipe.shapes_data is None or recipe.data_root is None:
        return None
    root = Path(recipe.data_root)
    if (root / "meta.json").is_file():
        check_shapes_settings(root, recipe.shapes_data.model_dump())
        # A file the generator added since the folder was written (e.g. draw_ask.jsonl) is missing there.
        missing = [e.path for e in recipe.data
                   if not any(c in e.path for c in "{*?[") and not (root / e.path).is_file()]  # fmt: skip
        if missing:
            raise SetupError(
                f"data_root={root} has no {', '.join(missing)} (an older ShapesWorld generator wrote it): "
                "set data_root=NEWDIR to generate the recipe's data there, or delete the folder"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise SetupError(
            f"data_root={root} exists but holds no ShapesWorld meta.json; point data_root at an empty "
            "or missing folder to generate the data there"
        )
    from orion_mllm.data.shapes.datasets import write_shapes_dataset

    s = recipe.shapes_data
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    print(f"generating ShapesWorld data in {root} ...", flush=True)
    write_shapes_dataset(
        tmp,
        size=s.size,
        n_und=s.n_und,
        n_gen=s.n_gen,
        n_edit=s.n_edit,
        n_interleaved=s.n_interleaved,
        n_heldout=s.n_heldout,
        seed=s.seed,
        gen_layout=s.gen_layout,
        holdout=s.holdout,
        caption_order=s.caption_order,
        add_layout=s.add_layout,
        question_first=s.question_first,
        mcq_answer=s.mcq_answer,
        progress=progress,
    )
    if root.exists():
        root.rmdir()
    tmp.rename(root)  # all or nothing: a killed generation never looks like finished data
    print(f"ShapesWorld data ready in {time.time() - t0:.1f} s", flush=True)
    return root
