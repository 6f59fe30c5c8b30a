"""Learning-curve figures for issue 16 (benchmarks/SMALL_SCALE.md) from the per-checkpoint JSON files.

    python benchmarks/plot_curves.py --stage0 runs/exp/s0-long --stage2 runs/exp/s2-long --out docs/figures

``--stage0 RUN``: ``RUN/curve/step_*/und.json`` (``orion eval shapes-und`` on each exported checkpoint);
``--stage2 RUN``: ``RUN/curve/step_*/diag-g*.json`` (``benchmarks/prompt_dependence.py``). Each figure
also reads the run's ``metrics.jsonl`` for the training loss. Prints one JSON object last: the points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _points(run: Path, pattern: str) -> list[tuple[int, dict]]:
    points = []
    for path in sorted(run.glob(f"curve/step_*/{pattern}")):
        text = path.read_text().strip()
        if text:
            points.append((int(path.parent.name.split("_")[1]), json.loads(text)))
    return points


def _loss(run: Path, key: str, every: int = 50) -> tuple[list[int], list[float]]:
    steps, values, window = [], [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get(key) is None:
            continue
        window.append(row[key])
        if len(window) == every:
            steps.append(row["step"])
            values.append(sum(window) / every)
            window = []
    return steps, values


def plot_stage0(run: Path, out: Path) -> dict:
    points = _points(run, "und.json")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [s for s, _ in points]
    for key in ("overall", "colour", "shape", "count", "existence", "position", "caption", "mcq"):
        a.plot(
            steps,
            [p.get(key, 0.0) for _, p in points],
            marker="o",
            lw=2.5 if key == "overall" else 1,
            label=key,
        )
    a.set(
        xlabel="stage-0 step",
        ylabel="shapes-und accuracy (held-out)",
        ylim=(0, 1),
        title="Base understanding",
    )
    a.legend(fontsize=7, ncol=2)
    b.plot(*_loss(run, "ce"))
    b.set(xlabel="stage-0 step", ylabel="training CE (mean of 50 steps)", title="Stage-0 loss")
    fig.tight_layout()
    fig.savefig(out / "curve_stage0.png", dpi=90)
    return {"stage0": [{"step": s, **p} for s, p in points]}


def plot_stage2(run: Path, out: Path) -> dict:
    points = _points(run, "diag-g*.json")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [s for s, _ in points]
    a.plot(
        steps,
        [p["shapes_gen_subset"]["overall"] for _, p in points],
        marker="o",
        lw=2.5,
        label="shapes-gen (subset)",
    )
    a.plot(
        steps, [p["shapes_gen_subset"]["single_object"] for _, p in points], marker="o", label="single object"
    )
    a.plot(steps, [p["free_nearest_is_own"] for _, p in points], marker="s", label="nearest target is own")
    a.set(xlabel="stage-2 step", ylim=(0, 1), title="Free-running generation")
    a.legend(fontsize=7)
    b.plot(steps, [p["tf_mse"] for _, p in points], marker="o", label="teacher-forced")
    b.plot(
        steps,
        [p["tf_mse_swapped_captions"] for _, p in points],
        marker="o",
        label="teacher-forced, captions swapped",
    )
    b.plot(steps, [p["free_mse_own"] for _, p in points], marker="o", label="free-running, own target")
    b.axhline(points[0][1]["mean_image_mse"] if points else 0, ls="--", c="grey", label="mean image")
    b.set(xlabel="stage-2 step", ylabel="token MSE", title="Regression error")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve_stage2.png", dpi=90)
    return {
        "stage2": [{"step": s, **{k: v for k, v in p.items() if "per_position" not in k}} for s, p in points]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage0", type=Path)
    ap.add_argument("--stage2", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.stage0:
        result |= plot_stage0(args.stage0, args.out)
    if args.stage2:
        result |= plot_stage2(args.stage2, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
