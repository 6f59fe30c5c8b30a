"""Understanding accuracy by the number of objects in the picture (issue 16: does the base bind a question to
one object among several?).

    python benchmarks/und_by_objects.py MODEL DATA N

Asks the first N single-question colour / shape / count / existence records of DATA/und.jsonl and prints
one line per (question type, number of objects): count and accuracy.
"""

import collections
import sys
from pathlib import Path

from orion_mllm.eval.model_eval import answer_many, read_jsonl
from orion_mllm.eval.shapes_und_edit import normalise
from orion_mllm.inference.pipeline import OrionPipeline

model, data, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
recs = [r for r in read_jsonl(data / "und.jsonl") if r["qtype"] in ("colour", "shape", "count", "existence")][
    :n
]
pipe = OrionPipeline.load(model)
asked = [(data / r["image"], r["conversations"][:1]) for r in recs]
ans = answer_many(pipe, asked, progress=False)
acc = collections.defaultdict(list)
for r, a in zip(recs, ans, strict=True):
    acc[(r["qtype"], len(r["scene"]["objects"]))].append(
        normalise(a) == normalise(r["conversations"][1]["value"])
    )
for k in sorted(acc):
    print(k, len(acc[k]), round(sum(acc[k]) / len(acc[k]), 2))
