"""How many "add" edits of a ShapesWorld folder have a free place under ``add_layout: canonical`` (issue 16).

    python benchmarks/add_slots.py DATA_DIR

For each "add" record of ``DATA_DIR/edit.jsonl``, ``canonical_addition`` is asked for a place for the
named object beside the record's source objects; the rest keep their random place. Prints JSON last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orion_mllm.data.shapes.datasets import canonical_addition
from orion_mllm.data.shapes.world import Scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    args = ap.parse_args()
    lines = (args.data / "edit.jsonl").read_text().splitlines()
    adds = [r for r in map(json.loads, lines) if r["op"] == "add"]
    placed = 0
    for r in adds:
        new = r["scene"]["objects"][-1]
        placed += canonical_addition(Scene.from_dict(r["source"]), new["shape"], new["colour"]) is not None
    print(json.dumps({"adds": len(adds), "placed": placed, "share": placed / max(1, len(adds))}))


if __name__ == "__main__":
    main()
