"""Build the committed stage-0 base of a ShapesWorld preset (``bases/PRESET``), with its provenance.

    OMP_NUM_THREADS=2 python scripts/build_base.py --preset tiny [--work runs/build-base-tiny]

Trains stage 0's phases (``recipes/shapes/PRESET/stage0_base.yaml``, then ``stage0_mcq.yaml`` and
``stage0_recap.yaml`` where the preset has them; ``orion_mllm.workflow.stage0``) exactly as ``orion
quickstart --from-scratch`` would (same recipes, no overrides; the data is written under ``--work``),
then copies the last phase's run (model, run.json, recipe.yaml) into ``bases/PRESET`` with
``provenance.json``: this command, each phase's resolved recipe, seed, git commit, wall time and
machine. ``orion quickstart`` then starts from it; after any change to those recipes, rerun this (the
quickstart refuses a base whose recorded recipes differ), then ``scripts/build_decoder.py`` (the new
base replaces ``bases/PRESET`` whole, so the decoder trained on the old one's tokens goes with it).
Re-running with the same ``--work`` resumes the training. ``--reuse-base`` (e.g. ``bases/tiny``) takes a
committed base whose recorded phases are the first ones of the tree's as their result and trains only
the later phases (the provenance says so, with the reused phases' own). Prints the provenance as JSON
last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from orion_mllm.workflow.committed_base import bases_root, build_base, folder_bytes
from orion_mllm.workflow.committed_decoder import committed_decoder
from orion_mllm.workflow.quickstart import recipe_path
from orion_mllm.workflow.stage0 import stage0_recipe_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["micro", "tiny"])
    ap.add_argument("--work", type=Path, default=None, help="run folder (default: runs/build-base-PRESET)")
    ap.add_argument(
        "--reuse-base", type=Path, default=None,
        help="a committed base trained with the tree's first phases: train only the later ones on top of it",
    )  # fmt: skip
    args = ap.parse_args()
    work = args.work or Path(f"runs/build-base-{args.preset}")
    target = bases_root() / args.preset
    # The new base replaces the whole folder, the decoder committed beside the old one included: it was
    # trained on the old base's tokens (the quickstart would refuse it by the base's hash anyway).
    had_decoder = committed_decoder(args.preset) is not None
    command = "python scripts/build_base.py " + shlex.join(sys.argv[1:])
    provenance = build_base(
        stage0_recipe_files(recipe_path(args.preset, "stage0_base")), target, work, command=command,
        reuse=args.reuse_base,
    )  # fmt: skip
    minutes = provenance["wall_seconds"] / 60
    print(f"{target}: {folder_bytes(target) / 2**20:.1f} MB, {minutes:.1f} min of training")
    phases = [{k: v for k, v in p.items() if k != "recipe"} for p in provenance["phases"]]
    if had_decoder:
        print(
            f"{target}/decoder was removed with the old base: "
            f"python scripts/build_decoder.py --preset {args.preset}"
        )
    print(json.dumps({**provenance, "phases": phases}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
