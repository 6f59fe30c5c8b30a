"""Build the committed diffusion decoder of a ShapesWorld preset (``bases/PRESET/decoder``), with its
provenance.

    OMP_NUM_THREADS=2 python scripts/build_decoder.py --preset tiny [--work runs/build-decoder-tiny]

Trains ``recipes/shapes/PRESET/decoder.yaml`` on the tokens of the committed base ``bases/PRESET`` exactly
as ``orion quickstart``'s decoder step would (same recipe, no overrides; the data is written under
``--work``), then keeps its network (every weight but the coarse map, which the quickstart fits again)
with ``decoder_config.json``, ``run.json``, ``recipe.yaml`` and ``provenance.json``: this command, the
resolved recipe, the base's SHA-256, seed, git commit, wall time and machine. After any change to the
decoder recipe or the base, rerun this (the quickstart trains the decoder itself while the recorded
recipe or base differs). Re-running with the same ``--work`` resumes the training. Prints the provenance
as JSON last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from orion_mllm.workflow.committed_base import bases_root, committed_base, folder_bytes
from orion_mllm.workflow.committed_decoder import DECODER_DIR, build_decoder
from orion_mllm.workflow.quickstart import recipe_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["micro", "tiny"])
    ap.add_argument("--work", type=Path, default=None, help="run folder (default: runs/build-decoder-PRESET)")
    args = ap.parse_args()
    base = committed_base(args.preset)
    if base is None:
        print(f"no committed base for {args.preset}: python scripts/build_base.py --preset {args.preset}",
              file=sys.stderr)  # fmt: skip
        return 2
    work = args.work or Path(f"runs/build-decoder-{args.preset}")
    target = bases_root() / args.preset / DECODER_DIR
    command = "python scripts/build_decoder.py " + shlex.join(sys.argv[1:])
    provenance = build_decoder(recipe_path(args.preset, "decoder"), base, target, work, command=command)
    print(f"{target}: {folder_bytes(target) / 2**20:.1f} MB ({folder_bytes(base) / 2**20:.1f} MB in {base}), "
          f"{provenance['wall_seconds'] / 60:.1f} min of training")  # fmt: skip
    print(json.dumps({k: v for k, v in provenance.items() if k != "recipe"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
