"""Per-seed numbers of an ``orion ablate`` folder, finished runs only (issue 16).

    python benchmarks/ablation_seeds.py runs/ablate-full

One markdown row per configuration and seed whose evaluation finished: shapes-gen (overall, on the
prompts whose caption training never saw, per GenEval category), shapes-und, drift KL, shapes-edit;
read from ``OUT/CONFIG/seedN/eval/*.json`` as ``orion ablate`` wrote them. ``orion ablate --report-only``
gives the mean ± std table; this is what is under it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from orion_mllm.workflow.ablate import CONFIGS, EVAL_PARTS

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def rows(root: Path) -> list[str]:
    out = []
    for name in CONFIGS:
        for ev in sorted((root / name).glob("seed*/eval")):
            if not all((ev / f"{p}.json").is_file() for p in EVAL_PARTS):
                continue
            r = {p: json.loads((ev / f"{p}.json").read_text()) for p in EVAL_PARTS}
            gen, und, edit, drift = r["gen"], r["und"], r["edit"], r["drift"]
            cats = " / ".join(f"{gen[c]:.2f}" for c in CATEGORIES)
            unseen = gen.get("unseen_scores", {}).get("overall")
            out.append(
                f"| {name} | {ev.parent.name.removeprefix('seed')} | {gen['overall']:.3f} | "
                f"{'-' if unseen is None else f'{unseen:.3f}'} | {cats} | {und['overall']:.3f} | "
                f"{drift['drift_kl']:.2f} | {edit['overall']:.3f} |"
            )
    return out


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print("| config | seed | shapes-gen | unseen captions | single / two / counting / colours / position / "
          "colour attr | shapes-und | drift KL | shapes-edit |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
