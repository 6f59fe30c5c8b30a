"""How the ShapesWorld scorer reads one image's foreground colours (why an object is or is not detected).

    python benchmarks/colour_votes.py IMAGE

Runs the scorer's own pixel classification (``scorer.classify_pixels`` and its 3x3 majority filter)
and prints, over the foreground pixels, the count per palette colour and the agreement of the commonest
one, which a detection needs to reach ``MIN_COLOUR_AGREEMENT``. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from orion_mllm.data.shapes.scorer import (
    _COLOUR_NAMES,
    MIN_COLOUR_AGREEMENT,
    _majority3,
    _to_array,
    classify_pixels,
    detect_objects,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    args = ap.parse_args()
    image = Image.open(args.image)
    labels, _, fg = classify_pixels(_to_array(image))
    fg = _majority3(fg)
    votes = np.bincount(labels[fg], minlength=len(_COLOUR_NAMES))
    total = int(votes.sum())
    print(json.dumps({
        "image": args.image, "foreground_pixels": total,
        "votes": {c: int(v) for c, v in zip(_COLOUR_NAMES, votes, strict=True) if v},
        "agreement": round(float(votes.max() / total), 3) if total else 0.0,
        "min_agreement": MIN_COLOUR_AGREEMENT, "detections": len(detect_objects(image)),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
