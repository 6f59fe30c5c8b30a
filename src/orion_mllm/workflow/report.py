"""The quickstart's ``report.md`` and ``metrics.json``: numbers, pictures and loss curves of one run.

``report.md`` holds the metrics table (base vs final model), a grid of generated images for fixed
prompts, a few edits (source, output, target), one interleaved generate-then-ask dialogue, the
semantic-drift figure and the loss curves of every stage (PNG files under ``report/``).
``metrics.json`` is the machine-readable summary (keys listed in ``METRIC_KEYS``).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from orion_mllm.data.shapes.scorer import CATEGORIES
from orion_mllm.train.metrics import read_metrics

if TYPE_CHECKING:
    from orion_mllm.workflow.quickstart import Quickstart

# Fixed prompts of the image grid: every GenEval category; the last two are captions ShapesWorld's
# default hold-out keeps out of training (``is_held_out_caption``; tests/test_report.py checks it).
GRID_PROMPTS = (
    "a red circle",
    "a blue square and a green triangle",
    "three yellow stars",
    "a black cross to the left of an orange diamond",
    "a purple star",
    "four circles",
    "a green circle above a red square",  # held out: never in training
    "a black cross and an orange star",  # held out
)
METRIC_KEYS = (
    "model_dir", "base_und_accuracy", "final_und_accuracy", "gen_overall",
    *(f"gen_{c}" for c in CATEGORIES), "edit_accuracy", "drift_kl_final", "wall_minutes", "preset",
    "gen_unseen_overall", "gen_unseen_prompts", "interleaved_accuracy", "interleaved_swapped_accuracy",
)  # fmt: skip
SCALE = 3  # 64 px ShapesWorld images are shown 3x, nearest-neighbour


# How report.md names each reason a prompt is unseen (orion_mllm.eval.model_eval.TrainingCaptions).
UNSEEN_REASONS = {
    "held_out_caption": "ShapesWorld holds its caption out of training",
    "heldout_pair": "its colour-shape pair is in no training image",
    "heldout_count": "its count is in no training image",
    "new_combination": "training never happened to draw its caption",
}


def captioned_grid(
    images: Sequence[Image.Image], captions: Sequence[str], cols: int, width: int = 28
) -> Image.Image:
    """Images in a grid, each upscaled ``SCALE``x with its caption (wrapped) underneath."""
    side = max(im.width for im in images) * SCALE
    lines = [textwrap.wrap(c, width) or [""] for c in captions]
    text_h = 12 * max(len(w) for w in lines) + 6
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (side + 8) + 8, rows * (side + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, wrapped) in enumerate(zip(images, lines, strict=True)):
        x = 8 + (k % cols) * (side + 8)
        y = 8 + (k // cols) * (side + text_h + 8)
        sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        draw.rectangle((x - 1, y - 1, x + side, y + side), outline=(180, 180, 180))
        for j, line in enumerate(wrapped):
            draw.text((x, y + side + 3 + 12 * j), line, fill=(0, 0, 0))
    return sheet


def plot_losses(run_dirs: dict[str, Path], path: Path) -> None:
    """One panel per stage: every loss term it logged (and the drift KL), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, read_metrics(d)) for name, d in run_dirs.items() if (d / "metrics.jsonl").is_file()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels, strict=True):
        for key, colour in (
            ("ce", "#4f81bd"),
            ("mse", "#c0504d"),
            ("kl", "#9bbb59"),
            ("drift_kl", "#8064a2"),
        ):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            if key == "mse" and name == "decoder":
                key = "flow loss"
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), label=key, color=colour, marker="o" if len(pts) < 30 else None
                )
        ax.set(title=name, xlabel="step", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def collect_metrics(qs: Quickstart) -> dict[str, Any]:
    """metrics.json: the issue's keys plus per-type breakdowns and the run's settings."""
    base = _load(qs.out / "eval" / "base" / "und.json")
    ev = {
        p: _load(qs.out / "eval" / "final" / f"{p}.json")
        for p in ("und", "gen", "edit", "interleaved", "drift")
    }
    state = _load(qs.out / "quickstart.json")
    seconds = sum(s["seconds"] for s in state["steps"].values())
    metrics: dict[str, Any] = {
        "model_dir": str(qs.out / "model"),
        "preset": qs.preset,
        # Where stage 0 came from: the committed base (bases/PRESET) or trained in this run.
        "stage0_source": f"committed {qs.base}" if qs.base is not None else "trained",
        "base_und_accuracy": base["overall"],
        "final_und_accuracy": ev["und"]["overall"],
        "gen_overall": ev["gen"]["overall"],
        **{f"gen_{c}": ev["gen"].get(c) for c in CATEGORIES},
        "edit_accuracy": ev["edit"]["overall"],
        "interleaved_accuracy": ev["interleaved"]["overall"],
        # The same questions with each drawing swapped for another dialogue's: answers read from the
        # picture drop; answers read from the prompt's words do not.
        "interleaved_swapped_accuracy": ev["interleaved"].get("overall_swapped"),
        # Prompts whose caption never occurs in the training records (drawing, not recall).
        "gen_unseen_overall": ev["gen"].get("unseen_scores", {}).get("overall"),
        "gen_seen_prompts": ev["gen"].get("seen"),
        "gen_unseen_prompts": ev["gen"].get("unseen"),
        "gen_guidance": ev["gen"].get("guidance"),
        "drift_kl_final": ev["drift"]["drift_kl"],
        "drift_top5_overlap_final": ev["drift"].get("drift_top5_overlap"),
        "wall_minutes": round(seconds / 60, 2),
        "step_minutes": {k: round(v["seconds"] / 60, 2) for k, v in state["steps"].items()},
        "base_und": base,
        "final_und": ev["und"],
        "final_gen": ev["gen"],
        "final_edit": ev["edit"],
        "max_steps": qs.max_steps,
        "eval_limit": qs.eval_limit,
        "eval_sizes": {
            k: getattr(qs.sizes, k) for k in ("und", "edit", "interleaved", "gen_per_category", "drift")
        },
    }
    return metrics


def write_report(qs: Quickstart) -> dict[str, Any]:
    """Write ``report/`` figures, ``report.md`` and ``metrics.json`` under ``qs.out``."""
    from orion_mllm.inference.pipeline import OrionPipeline
    from orion_mllm.workflow.evaluate import SHAPES_IMAGE_SEPARATOR

    out = qs.out
    fig_dir = out / "report"
    fig_dir.mkdir(exist_ok=True)
    metrics = collect_metrics(qs)
    stages = {
        name: out / name
        for name in ("stage0_base", "decoder", "stage1_warmup", "stage2_pretrain", "stage3_sft")
    }
    plot_losses(stages, fig_dir / "loss_curves.png")

    pipe = OrionPipeline.load(
        out / "model", image_separator=SHAPES_IMAGE_SEPARATOR, device="cpu", dtype="fp32"
    )
    tokens, _ = zip(*(pipe.image_tokens(p) for p in GRID_PROMPTS), strict=True)
    grid = pipe.render([t[0] for t in tokens], seed=0)
    captioned_grid(grid, GRID_PROMPTS, cols=4).save(fig_dir / "generations.png")

    edit_json = _load(out / "eval" / "final" / "edit.json")
    eval_root = qs.eval_data
    edits = [json.loads(line) for line in (eval_root / "edit.jsonl").read_text().splitlines()[:4]]
    ims, caps = [], []
    for r in edits:
        output = out / "eval" / "final" / "edit_images" / f"{r['id']}.png"
        ims += [
            Image.open(eval_root / r["images"][0]),
            Image.open(output),
            Image.open(eval_root / r["images"][1]),
        ]
        caps += [f"source: {r['instruction']}", "model output", "target"]
    captioned_grid(ims, caps, cols=3, width=30).save(fig_dir / "edits.png")

    inter = _load(out / "eval" / "final" / "interleaved.json")
    dialogue = next((d for d in inter["examples"] if "image" in d), None)
    drift = _load(out / "eval" / "final" / "drift.json")
    base_und = metrics["base_und"]
    final_und = metrics["final_und"]
    gen = metrics["final_gen"]
    per_step = ", ".join(f"{k} {v:.1f}" for k, v in metrics["step_minutes"].items())
    smoke = (
        f" Smoke settings: max_steps={qs.max_steps}, eval_limit={qs.eval_limit}."
        if qs.max_steps or qs.eval_limit
        else ""
    )
    und_types = [k for k in sorted(final_und) if k not in ("overall", "questions", "question_first")]
    asked = "question, then picture" if final_und.get("question_first") else "picture, then question"
    edit_ops = [k for k in sorted(edit_json) if k not in ("overall", "edits")]
    lines = [
        f"# ORION quickstart report ({qs.preset})",
        "",
        f"Run directory `{out}`; final model `{metrics['model_dir']}` (decoder inside; it works with "
        "`orion generate / ask / edit / chat / serve`). Wall time of the steps: "
        f"**{metrics['wall_minutes']:.1f} min** ({per_step} min).{smoke} "
        f"Stage 0: {metrics['stage0_source']}.",
        "",
        "## Metrics",
        "",
        "| benchmark | base (stage 0) | final (stage 3) |",
        "| --- | --- | --- |",
        f"| shapes-und overall ({final_und['questions']} questions; {asked}, as trained) | "
        f"{_pct(base_und['overall'])} | "
        f"{_pct(final_und['overall'])} |",
        *(f"| &nbsp; und {k} | {_pct(base_und.get(k))} | {_pct(final_und.get(k))} |" for k in und_types),
        f"| shapes-gen overall ({gen['samples']} prompts, token guidance "
        f"{metrics.get('gen_guidance') or 1:g}) | - | {gen['overall']:.3f} |",
        *(f"| &nbsp; gen {c} | - | {gen[c]:.3f} |" for c in CATEGORIES if c in gen),
        *(
            [f"| &nbsp; gen on the {gen['unseen']} prompts whose caption is not in training "
             f"({gen['seen']} are) | - | {metrics['gen_unseen_overall']:.3f} |"]
            if metrics.get("gen_unseen_overall") is not None else []
        ),
        *(
            f"| &nbsp; &nbsp; unseen because {UNSEEN_REASONS.get(k, k)} ({v['prompts']} prompts, share "
            f"drawn right) | - | {v['accuracy']:.3f} |"
            for k, v in gen.get("unseen_by_reason", {}).items()
        ),
        f"| shapes-edit overall ({edit_json['edits']} edits) | - | {_pct(edit_json['overall'])} |",
        *(f"| &nbsp; edit {k} | - | {_pct(edit_json[k])} |" for k in edit_ops),
        f"| interleaved generate-then-ask ({inter['dialogues']} dialogues) | - | "
        f"{_pct(inter['overall'])} |",
        *(
            [f"| &nbsp; same questions, each drawing swapped for another dialogue's | - | "
             f"{_pct(inter['overall_swapped'])} |"]
            if inter.get("overall_swapped") is not None else []
        ),
        f"| drift KL(base ‖ final) at visual positions | 0 | {drift['drift_kl']:.4f} |",
        f"| drift top-5 overlap | 1 | {drift.get('drift_top5_overlap', float('nan')):.3f} |",
        "",
        "## Generated images (fixed prompts; the last two are held-out captions, never in training)",
        "",
        "![generations](report/generations.png)",
        "",
        "## Edits (held-out sources)",
        "",
        "![edits](report/edits.png)",
        "",
        "## Interleaved dialogue (the model answers about the picture it drew, from its own tokens)",
        "",
    ]  # fmt: skip
    if dialogue is not None:
        rel = Path(dialogue["image"]).relative_to(out)
        lines += [
            f"- **user:** {dialogue['prompt']}",
            f"- **model:** ![drawn]({rel})",
            f"- **user:** {dialogue['question']}",
            f"- **model:** {dialogue['answer']}  (expected: {dialogue['gold']})",
            "",
        ]
    lines += [
        "## Semantic drift (Figure 3): the text head at visual positions, base vs final",
        "",
        "![drift](eval/final/drift/drift.png)",
        "",
        "Details: `eval/final/drift/drift.md`.",
        "",
        "## Loss curves",
        "",
        "![losses](report/loss_curves.png)",
        "",
        f"Training metrics per step: `<stage>/metrics.jsonl`; TensorBoard: `tensorboard --logdir {out}`.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    summary = {k: metrics[k] for k in METRIC_KEYS}
    full = {**summary, **{k: v for k, v in metrics.items() if k not in summary}}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(full, indent=2) + "\n")
    tmp.replace(out / "metrics.json")
    return full


__all__ = ["GRID_PROMPTS", "METRIC_KEYS", "captioned_grid", "collect_metrics", "plot_losses", "write_report"]
