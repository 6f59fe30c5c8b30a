"""``orion quickstart``: the whole ORION pipeline on ShapesWorld, in one resumable command.

    orion quickstart [--preset tiny|micro] [--out runs/quickstart-tiny]

Steps (each a directory under OUT): ``stage0_base`` (the small base VLM, understanding only, which
stands in for Qwen2.5-VL's own pretraining and becomes the KL teacher; trained in phases, see
``orion_mllm.workflow.stage0``, or copied from the committed base ``bases/PRESET``), ``decoder``
(the diffusion decoder, trained on the base's frozen visual tokens, or, with the committed base, the
network committed beside it in ``bases/PRESET/decoder`` with its coarse map fitted here), ORION's
``stage1_warmup``, ``stage2_pretrain`` and ``stage3_sft`` (recipes under ``recipes/shapes/PRESET/``),
``model`` (the final model directory: stage 3's export with the decoder in ``model/decoder/``, ready
for ``orion generate/ask/edit/chat/serve``), the evaluations of the base and final models (``eval/``), then
``report.md`` and ``metrics.json``.

Re-running the same command resumes: a finished step is skipped (``quickstart.json`` records what
finished and how long it took), and an interrupted training stage continues from its newest
checkpoint (the trainer's own resume). ``--max-steps`` caps every training stage and ``--eval-limit``
every evaluation set, for smoke runs; both are recorded, and a run cannot be resumed with other
values.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orion_mllm.train.recipe import load_recipe
from orion_mllm.workflow.committed_base import BaseMismatch, check_base, committed_base, install_base
from orion_mllm.workflow.committed_decoder import check_decoder, committed_decoder
from orion_mllm.workflow.evaluate import EvalSizes, evaluate_model
from orion_mllm.workflow.stage0 import stage0_recipe_files, train_stage0
from orion_mllm.workflow.train_stage import step_cap, train_stage

PRESETS = ("micro", "tiny")
STATE_FILE = "quickstart.json"
MODEL_DIR = "model"
TRAIN_STAGES = ("stage0_base", "decoder", "stage1_warmup", "stage2_pretrain", "stage3_sft")

# Evaluation set sizes per preset (micro is a smoke run: small sets, its numbers are not targets).
EVAL_SIZES = {
    "micro": EvalSizes(und=60, edit=40, interleaved=20, gen_per_category=12, drift=16),
    "tiny": EvalSizes(),
}

# The decoder step with a committed decoder: its data and the coarse map's fit (2-core CPU: tiny 153 s on
# session 16's slow machine, whose other steps ran ~1.4x the STEPS figures; micro ~10 s in the tests).
COMMITTED_DECODER_S = {"micro": 10, "tiny": 110}


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    expected_s: dict[str, float]  # measured seconds on our 2-core CPU, per preset (for the ETA)


STEPS = (
    Step("stage0_base", "stage 0: base VLM, understanding only", {"micro": 19, "tiny": 1933}),
    Step("decoder", "diffusion decoder on the base's visual tokens", {"micro": 23, "tiny": 275}),
    Step("stage1_warmup", "ORION stage 1: vision-head warm-up (MSE)", {"micro": 4, "tiny": 112}),
    Step("stage2_pretrain", "ORION stage 2: pretrain, CE:MSE:KL", {"micro": 14, "tiny": 1025}),
    Step("stage3_sft", "ORION stage 3: SFT with editing", {"micro": 18, "tiny": 280}),
    Step("model", "final model directory (LLM + head + decoder)", {"micro": 1, "tiny": 1}),
    Step("eval_base", "evaluate the base model (understanding)", {"micro": 2, "tiny": 6}),
    Step("eval_final", "evaluate the final model", {"micro": 4, "tiny": 45}),
    Step("report", "report.md, metrics.json, figures", {"micro": 2, "tiny": 3}),
)


def recipes_root() -> Path:
    """The repository's ``recipes/`` folder (the project is installed editable, as the README says)."""
    root = Path(__file__).resolve().parents[3] / "recipes"
    if not root.is_dir():
        raise FileNotFoundError(
            f"recipes folder not found at {root}: install orion-mllm from its repository (pip install -e .)"
        )
    return root


def recipe_path(preset: str, stage: str) -> Path:
    path = recipes_root() / "shapes" / preset / f"{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    return path


def assemble_model_dir(model: Path, decoder: Path, target: Path) -> Path:
    """``target`` = a copy of ``model`` with ``decoder`` in its ``decoder/`` folder, written to a
    temporary folder and renamed, so an interrupted copy never looks like a finished model."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    shutil.copytree(decoder, tmp / "decoder")
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return target


class Quickstart:
    def __init__(
        self,
        preset: str = "tiny",
        out: str | Path | None = None,
        *,
        max_steps: int | None = None,
        eval_limit: int | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        from_scratch: bool = False,
        bases: Path | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"--max-steps {max_steps}: must be >= 1")
        if eval_limit is not None and eval_limit < 1:
            raise ValueError(f"--eval-limit {eval_limit}: must be >= 1")
        self.preset = preset
        self.out = Path(out or f"runs/quickstart-{preset}").resolve()
        self.max_steps = max_steps
        self.eval_limit = eval_limit
        self.progress = progress
        self.log = log
        self.from_scratch = from_scratch
        # The committed stage-0 base this run starts from (None: stage 0 is trained here).
        self.base = None if from_scratch else committed_base(preset, bases)
        # The decoder committed beside it (None: the decoder is trained here). It was trained on that
        # base's tokens, so it goes with it.
        self.base_decoder = None if self.base is None else committed_decoder(preset, bases)
        self.sizes = EVAL_SIZES[preset].limited(eval_limit)

    # ------------------------------------------------------------------ state

    def _settings(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "max_steps": self.max_steps, "eval_limit": self.eval_limit,
            "from_scratch": self.from_scratch,
        }  # fmt: skip

    def _load_state(self) -> dict[str, Any]:
        path = self.out / STATE_FILE
        if not path.is_file():
            if self.out.exists() and any(self.out.iterdir()):
                raise ValueError(
                    f"--out {self.out} is not empty and holds no {STATE_FILE}: choose another --out"
                )
            return {**self._settings(), "steps": {}}
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); remove it to start over") from None
        # Runs started before --from-scratch existed: that setting is taken as the current one.
        old = {k: state.get(k, v if k == "from_scratch" else None) for k, v in self._settings().items()}
        if old != self._settings():
            changed = ", ".join(f"{k} {old[k]} -> {v}" for k, v in self._settings().items() if old[k] != v)
            raise ValueError(
                f"{self.out} was started with other settings ({changed}): rerun with the same ones "
                "or choose another --out"
            )
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.out / STATE_FILE)

    # ------------------------------------------------------------------ steps

    def overrides(self, stage: str) -> list[str]:
        """Data under OUT/data (each recipe's folder name kept), and the smoke-run step cap."""
        recipe = load_recipe(recipe_path(self.preset, stage))
        extra = []
        if recipe.data_root is not None:
            extra.append(f"data_root={self.out / 'data' / Path(recipe.data_root).name}")
        return extra + step_cap(recipe, self.max_steps)

    def expected_s(self, step: Step) -> float:
        """The step's measured seconds (for the ETA); copying a committed base takes about one, and a
        committed decoder leaves its data and coarse fit (``COMMITTED_DECODER_S``)."""
        if step.name == "stage0_base" and self.base is not None:
            return 1.0
        if step.name == "decoder" and self.base_decoder is not None:
            return COMMITTED_DECODER_S[self.preset]
        return step.expected_s[self.preset]

    def run_dir(self, stage: str) -> Path:
        return self.out / stage

    def _run_step(self, name: str) -> None:
        if name == "stage0_base" and self.base is not None:
            provenance = check_base(self.base, self.stage0_recipes, self.overrides(name))
            install_base(self.base, self.run_dir(name))
            self.log(
                f"  using the committed base {self.base} (stage 0, {provenance.get('steps')} steps, "
                f"{provenance.get('wall_seconds', 0) / 60:.1f} min when built); --from-scratch trains it here"
            )
        elif name == "stage0_base":
            train_stage0(self.stage0_recipes, self.run_dir(name), lambda f: self.overrides(f.stem))
        elif name == "decoder":
            train_stage(
                recipe_path(self.preset, name), self.run_dir(name), self.overrides(name),
                network=self._committed_network(),
            )  # fmt: skip
        elif name in TRAIN_STAGES:
            train_stage(recipe_path(self.preset, name), self.run_dir(name), self.overrides(name))
        elif name == MODEL_DIR:
            self.assemble_model()
        elif name == "eval_base":
            evaluate_model(
                self.run_dir("stage0_base") / "final", self.out / "eval" / "base", data_root=self.eval_data,
                image_size=self.image_size, sizes=self.sizes, parts=("und",), progress=self.progress,
                question_first=self.question_first("stage0_base"),
            )  # fmt: skip
        elif name == "eval_final":
            evaluate_model(
                self.out / MODEL_DIR, self.out / "eval" / "final", data_root=self.eval_data,
                image_size=self.image_size, sizes=self.sizes, base_dir=self.run_dir("stage0_base") / "final",
                progress=self.progress, train_gen=self.train_data / "gen.jsonl",
                question_first=self.question_first("stage3_sft"),
            )  # fmt: skip
        elif name == "report":
            from orion_mllm.workflow.report import write_report

            write_report(self)
        else:
            raise AssertionError(name)

    def _committed_network(self) -> Path | None:
        """The committed decoder's network when it was trained by the tree's decoder recipe on this run's
        base; else None (the decoder is trained here), saying why."""
        if self.base_decoder is None:
            return None
        try:
            provenance = check_decoder(
                self.base_decoder, recipe_path(self.preset, "decoder"), self.overrides("decoder"),
                self.run_dir("stage0_base") / "final",
            )  # fmt: skip
        except BaseMismatch as err:
            self.log(f"  not using the committed decoder: {err}; training it here (rebuild it: "
                     "python scripts/build_decoder.py)")  # fmt: skip
            return None
        self.log(
            f"  using the committed decoder {self.base_decoder} ({provenance.get('steps')} steps, "
            f"{provenance.get('wall_seconds', 0) / 60:.1f} min when built); its coarse map is fitted here"
        )
        return self.base_decoder / "final"

    @property
    def stage0_recipes(self) -> list[Path]:
        """Stage 0's phases: ``stage0_base.yaml`` and the later ones this preset has, in order."""
        return stage0_recipe_files(recipe_path(self.preset, "stage0_base"))

    @property
    def eval_data(self) -> Path:
        return self.out / "data" / "eval"

    @property
    def train_data(self) -> Path:
        """The ORION stages' ShapesWorld folder (its gen.jsonl tells which eval captions were seen)."""
        recipe = load_recipe(recipe_path(self.preset, "stage2_pretrain"))
        return self.out / "data" / Path(recipe.data_root or "shapes").name

    @property
    def image_size(self) -> int:
        """The ShapesWorld image side of this preset's recipes (the evaluation set uses the same)."""
        recipe = load_recipe(recipe_path(self.preset, "stage0_base"))
        if recipe.shapes_data is None:
            raise ValueError(f"{recipe_path(self.preset, 'stage0_base')}: no shapes_data section")
        return recipe.shapes_data.size

    def question_first(self, stage: str) -> bool:
        """Whether ``stage``'s understanding data asked before the picture (``shapes_data.question_first``):
        a model it trained is evaluated asking the same way."""
        recipe = load_recipe(recipe_path(self.preset, stage))
        return recipe.shapes_data is not None and recipe.shapes_data.question_first

    def assemble_model(self) -> Path:
        """OUT/model = stage 3's export + the decoder in ``decoder/``."""
        return assemble_model_dir(
            self.run_dir("stage3_sft") / "final", self.run_dir("decoder") / "final", self.out / MODEL_DIR
        )

    def run(self) -> dict[str, Any]:
        """Every step (the finished ones skipped); returns ``metrics.json``'s content."""
        self.run_until(tuple(s.name for s in STEPS))
        metrics_file = self.out / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        # The report step wrote metrics.json before its own time was recorded: count it too.
        state = self._load_state()
        metrics["wall_minutes"] = round(sum(s["seconds"] for s in state["steps"].values()) / 60, 2)
        metrics["step_minutes"] = {k: round(v["seconds"] / 60, 2) for k, v in state["steps"].items()}
        tmp = metrics_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(metrics_file)
        return metrics

    def run_until(self, names: tuple[str, ...]) -> None:
        """The named steps, in pipeline order (``orion ablate`` runs only the shared first ones)."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        self._save_state(state)
        started = time.time()
        ran_expected = ran_actual = 0.0
        steps = [s for s in STEPS if s.name in names]
        for k, step in enumerate(steps, 1):
            done = state["steps"].get(step.name)
            if done is not None:
                took = f"{done['seconds']:.0f} s"
                self.log(f"[quickstart {k}/{len(steps)}] {step.title}: done earlier ({took}), skipped")
                continue
            remaining = sum(self.expected_s(s) for s in steps[k - 1 :] if s.name not in state["steps"])
            # This machine's pace against the measured one, once steps of some length have run (copying a
            # committed base in a fraction of its expected second says nothing about training speed).
            pace = ran_actual / ran_expected if ran_expected >= 30 else 1.0
            elapsed = time.time() - started
            self.log(
                f"[quickstart {k}/{len(steps)}] {step.title} -> {self.out / step.name}  "
                f"(elapsed {elapsed / 60:.1f} min, about {remaining * pace / 60:.1f} min to go)"
            )
            t0 = time.time()
            self._run_step(step.name)
            seconds = time.time() - t0
            ran_expected += self.expected_s(step)
            ran_actual += seconds
            state["steps"][step.name] = {
                "seconds": round(seconds, 2),
                "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            self._save_state(state)


__all__ = ["EVAL_SIZES", "PRESETS", "STEPS", "Quickstart", "assemble_model_dir", "recipe_path"]
