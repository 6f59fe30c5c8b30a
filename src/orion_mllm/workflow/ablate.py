"""``orion ablate``: the paper's Table 4 (and appendix A.3) at ShapesWorld scale.

    orion ablate --preset tiny --seeds 3 [--configs A B ...] --out runs/ablate-tiny

Every configuration starts from the same stage-0 base model and decoder (trained once, in
``OUT/base`` by the quickstart's first steps, or taken from a finished ``orion quickstart`` run with
``--base DIR``) and runs ORION stages 1-3 with one change each:

====  ============  ====  ==================  =========================================
name  vision head   KL    stage-1 warm-up     paper
====  ============  ====  ==================  =========================================
A     linear        off   small (1/4)         Table 4 A (5M samples)
B     linear        off   large (full)        Table 4 B (20M)
C     qformer       off   small               Table 4 C
D     qformer       off   large               Table 4 D
E0    mlp           off   none                Table 4 E, "None"
E     mlp           off   small               Table 4 E
F     mlp           off   large               Table 4 F
G     mlp           on    large               Table 4 G (ORION, the quickstart's recipe)
LM    layer_mix     on    large               appendix A.3 (reported to fail at inference)
====  ============  ====  ==================  =========================================

"small" warm-up runs a quarter of stage 1's steps (the paper's 5M vs 20M samples), "none" skips
stage 1 (stage 2 starts from the base with a fresh head). The seed changes the head's
initialisation and the data order of stages 1-3. Each run is evaluated on shapes-und, shapes-gen,
shapes-edit and drift; ``OUT/ablation.md`` / ``OUT/ablation.json`` hold mean ± std over seeds.
Re-running resumes (finished runs and evaluations are skipped).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orion_mllm.train.recipe import load_recipe
from orion_mllm.workflow.evaluate import EvalSizes, evaluate_model, stale_parts
from orion_mllm.workflow.quickstart import (
    EVAL_SIZES,
    Quickstart,
    assemble_model_dir,
    recipe_path,
)
from orion_mllm.workflow.train_stage import step_cap, train_stage

WARMUP_FRACTION = {"none": 0.0, "small": 0.25, "large": 1.0}
EVAL_PARTS = ("und", "gen", "edit", "drift")  # what each configuration's final model is evaluated on


@dataclass(frozen=True)
class AblationConfig:
    name: str
    head: str
    kl: bool
    warmup: str  # none | small | large
    paper: str


CONFIGS = {
    c.name: c
    for c in (
        AblationConfig("A", "linear", False, "small", "Table 4 A"),
        AblationConfig("B", "linear", False, "large", "Table 4 B"),
        AblationConfig("C", "qformer", False, "small", "Table 4 C"),
        AblationConfig("D", "qformer", False, "large", "Table 4 D"),
        AblationConfig("E0", "mlp", False, "none", "Table 4 E (no warm-up)"),
        AblationConfig("E", "mlp", False, "small", "Table 4 E"),
        AblationConfig("F", "mlp", False, "large", "Table 4 F"),
        AblationConfig("G", "mlp", True, "large", "Table 4 G (ORION)"),
        AblationConfig("LM", "layer_mix", True, "large", "appendix A.3"),
    )
}
# (evaluation part, its key, column title)
COLUMNS = (
    ("und", "overall", "shapes-und"),
    ("gen", "overall", "shapes-gen"),
    ("edit", "overall", "shapes-edit"),
    ("drift", "drift_kl", "drift KL"),
)


class Ablation:
    def __init__(
        self,
        preset: str = "tiny",
        out: str | Path | None = None,
        *,
        seeds: int = 3,
        configs: Sequence[str] | None = None,
        max_steps: int | None = None,
        eval_limit: int | None = None,
        base: str | Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        names = list(configs or CONFIGS)
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            raise ValueError(f"--configs {' '.join(unknown)}: unknown; choose from {' '.join(CONFIGS)}")
        if seeds < 1:
            raise ValueError(f"--seeds {seeds}: must be >= 1")
        self.preset = preset
        self.out = Path(out or f"runs/ablate-{preset}").resolve()
        self.seeds = seeds
        self.configs = [CONFIGS[n] for n in names]
        self.max_steps = max_steps
        self.progress = progress
        self.log = log
        # The shared base model + decoder: the quickstart's first steps, in OUT/base, or those of a
        # finished quickstart run (``base``), with the settings it was made with.
        if base is None:
            self.base = Quickstart(
                preset,
                self.out / "base",
                max_steps=max_steps,
                eval_limit=eval_limit,
                progress=progress,
                log=log,
            )
        else:
            state_file = Path(base) / "quickstart.json"
            if not state_file.is_file():
                raise FileNotFoundError(f"--base {base}: not a quickstart run folder (no quickstart.json)")
            state = json.loads(state_file.read_text())
            if state.get("preset") != preset:
                raise ValueError(f"--base {base} is a {state.get('preset')!r} run, not {preset!r}")
            self.base = Quickstart(
                preset, base, max_steps=state.get("max_steps"), eval_limit=state.get("eval_limit"),
                progress=progress, log=log, from_scratch=bool(state.get("from_scratch", False)),
            )  # fmt: skip
        self.sizes: EvalSizes = EVAL_SIZES[preset].limited(eval_limit)

    def stage_overrides(self, cfg: AblationConfig, seed: int, stage: str, run: Path) -> list[str]:
        extra = [*self.base.overrides(stage), f"model.head={cfg.head}", f"train.seed={seed}"]
        # After the base's own overrides (the last value wins): a cap, never more than the recipe's steps.
        extra += step_cap(load_recipe(recipe_path(self.preset, stage), extra), self.max_steps)
        base_model = self.base.run_dir("stage0_base") / "final"
        if stage == "stage1_warmup":  # the shared base lives in OUT/base, not next to this run
            extra.append(f"model.init={base_model}")
        if stage == "stage1_warmup" and cfg.warmup == "small":
            recipe = load_recipe(recipe_path(self.preset, stage), extra)
            steps = self._stage_steps(recipe)
            extra.append(f"train.max_steps={max(1, math.ceil(steps * WARMUP_FRACTION['small']))}")
        if stage == "stage2_pretrain" and cfg.warmup == "none":
            extra += [f"model.init={base_model}", f"teacher={base_model}"]
        if stage != "stage1_warmup" and not cfg.kl:
            extra.append("loss.kl=0")
        return extra

    @staticmethod
    def _stage_steps(recipe) -> int:
        """Optimizer steps of a stage as recipes define them (epochs over the mixture, or max_steps)."""
        from orion_mllm.train.batches import open_mixture

        _, sampler = open_mixture(recipe)
        steps = math.ceil(recipe.train.epochs * sampler.samples_per_epoch / recipe.train.global_batch_size)
        return min(steps, recipe.train.max_steps) if recipe.train.max_steps else steps

    def run_one(self, cfg: AblationConfig, seed: int) -> dict[str, Any]:
        run = self.out / cfg.name / f"seed{seed}"
        stages = ["stage1_warmup", "stage2_pretrain", "stage3_sft"]
        if cfg.warmup == "none":
            stages.remove("stage1_warmup")
        for stage in stages:
            overrides = self.stage_overrides(cfg, seed, stage, run)
            train_stage(recipe_path(self.preset, stage), run / stage, overrides)
        model = run / "model"
        if not (model / "decoder").is_dir():
            assemble_model_dir(run / "stage3_sft" / "final", self.base.run_dir("decoder") / "final", model)
        return evaluate_model(
            model, run / "eval", data_root=self.base.eval_data, image_size=self.base.image_size,
            sizes=self.sizes, parts=EVAL_PARTS,
            base_dir=self.base.run_dir("stage0_base") / "final", progress=self.progress,
            train_gen=self.base.train_data / "gen.jsonl",
            question_first=self.base.question_first("stage3_sft"),
        )  # fmt: skip

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log(f"[ablate] shared base model and decoder -> {self.base.out}")
        self.base.run_until(("stage0_base", "decoder", "eval_base"))
        results: dict[str, list[dict[str, Any]]] = {}
        total = len(self.configs) * self.seeds
        k = 0
        for cfg in self.configs:
            for seed in range(self.seeds):
                k += 1
                self.log(f"[ablate {k}/{total}] config {cfg.name} ({cfg.paper}: head {cfg.head}, KL "
                         f"{'on' if cfg.kl else 'off'}, warm-up {cfg.warmup}), seed {seed}")  # fmt: skip
                results.setdefault(cfg.name, []).append(self.run_one(cfg, seed))
        return self.write_table(results)

    def finished(self) -> dict[str, list[dict[str, Any]]]:
        """The evaluations of the runs that have finished so far, per configuration (``--report-only``:
        a table of a long ablation before all of it has run)."""
        results: dict[str, list[dict[str, Any]]] = {}
        question_first = self.base.question_first("stage3_sft")
        for cfg in self.configs:
            for seed in range(self.seeds):
                ev = self.out / cfg.name / f"seed{seed}" / "eval"
                if ev.is_dir() and not stale_parts(ev, EVAL_PARTS, self.sizes, question_first):
                    runs = results.setdefault(cfg.name, [])
                    runs.append({p: json.loads((ev / f"{p}.json").read_text()) for p in EVAL_PARTS})
        return results

    def write_table(self, results: dict[str, list[dict[str, Any]]]) -> dict:
        """OUT/ablation.json and OUT/ablation.md from ``results`` (configurations without a run left out)."""
        if not any(results.values()):
            raise ValueError(f"{self.out}: no finished and evaluated run of configurations "
                             f"{' '.join(c.name for c in self.configs)} yet")  # fmt: skip
        # The base's understanding on the same records as every configuration's: the base run's own
        # evaluation when it used that size, else evaluated once here, in OUT/base_eval.
        same_size = self.base.sizes.und == self.sizes.und
        folder = self.base.out / "eval" / "base" if same_size else self.out / "base_eval"
        base_und = evaluate_model(
            self.base.run_dir("stage0_base") / "final", folder, data_root=self.base.eval_data,
            image_size=self.base.image_size, sizes=self.sizes, parts=("und",), progress=self.progress,
            question_first=self.base.question_first("stage0_base"),
        )["und"]["overall"]  # fmt: skip
        table = summarise([c for c in self.configs if results.get(c.name)], results, base_und)
        (self.out / "ablation.json").write_text(json.dumps(table, indent=2) + "\n")
        (self.out / "ablation.md").write_text(render_table(table, self))
        return table


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(
    configs: Sequence[AblationConfig], results: dict[str, list[dict[str, Any]]], base_und: float
) -> dict:
    rows = []
    for cfg in configs:
        runs = results[cfg.name]
        row: dict[str, Any] = {"config": cfg.name, "head": cfg.head, "kl": cfg.kl, "warmup": cfg.warmup,
                               "paper": cfg.paper}  # fmt: skip
        for part, key, _ in COLUMNS:
            row[part] = _mean_std([float(r[part][key]) for r in runs])
            row[f"{part}_per_seed"] = [float(r[part][key]) for r in runs]
        rows.append(row)
    return {"base_und": base_und, "rows": rows}


def render_table(table: dict, ablation: Ablation) -> str:
    def cell(stat: dict[str, float], pct: bool) -> str:
        if pct:
            return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"

    lines = [
        f"Preset `{ablation.preset}`, {ablation.seeds} seed(s) asked (the seeds column: how many finished); "
        f"base model (stage 0) understanding {100 * table['base_und']:.1f}%. Mean ± std over seeds.",
        "",
        "| config | vision head | KL | stage-1 warm-up | seeds | shapes-und (%) | shapes-gen "
        "| shapes-edit (%) | drift KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['config']} | {r['head']} | {'✓' if r['kl'] else '×'} | {r['warmup']} | {r['und']['n']} | "
            f"{cell(r['und'], True)} | {cell(r['gen'], False)} | {cell(r['edit'], True)} | "
            f"{cell(r['drift'], False)} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["CONFIGS", "Ablation", "AblationConfig", "render_table", "summarise"]
