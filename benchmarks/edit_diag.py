"""Why does a model not edit? Teacher-forced and free-running numbers on editing records (issue 16).

    python benchmarks/edit_diag.py --model runs/qs/model --data runs/qs/data/shapes-tiny [--records 48]

On the first ``--records`` editing records of ``edit.jsonl`` (training data, or an eval folder; ``--file``
for another editing file, e.g. one whose target is its source, to ask whether the model can copy):
- teacher-forced MSE of the target tokens (true previous target tokens fed), next to the MSE of
  simply copying the source image's tokens and of the per-position mean target: a model that learned
  editing beats both;
- free-running (the model's own tokens fed back, as ``orion eval shapes-edit`` does): MSE to the
  target, to the source (a model that copies the source is close to it), the outputs' spread across
  records, and their norm next to the targets' (a drifting regression leaves the token distribution);
- the same free-running numbers with the instruction alone, no source image (``free_no_source``):
  close to ``free`` means the source image is not read at all.

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from orion_mllm.data.sources import ConversationSource
from orion_mllm.eval.model_eval import regress_tokens, teacher_forced_tokens
from orion_mllm.inference.pipeline import OrionPipeline


def teacher_forced(pipe: OrionPipeline, records: list[dict]) -> tuple[torch.Tensor, ...]:
    """Teacher-forced predictions of the target image [R, N, d], the targets and the sources' tokens."""
    pred, enc = teacher_forced_tokens(pipe, records)
    sources, targets = [], []
    for e in enc:
        first = int(e.image_num_tokens[0])  # the source image's tokens come first, then the target's
        sources.append(e.visual_tokens[:first].float())
        targets.append(e.visual_tokens[first:].float())
    target, source = torch.stack(targets), torch.stack(sources)
    return pred.view(target.shape), target, source


def stats(free: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    return {
        "mse_target": ((free - target) ** 2).mean().item(),
        "mse_source": ((free - source) ** 2).mean().item(),
        "spread": free.var(0).mean().item(),
        "norm": free.norm(dim=-1).mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ORION model directory")
    ap.add_argument("--data", required=True, help="ShapesWorld data root holding edit.jsonl")
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--file", default="edit.jsonl", help="editing records under --data (e.g. a copy set)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    pipe = OrionPipeline.load(args.model, image_separator="\n")
    root = Path(args.data)
    src = ConversationSource("edit", "editing", root / args.file, root)
    records = [src.get(i).record for i in range(min(args.records, len(src)))]
    pred, target, source = teacher_forced(pipe, records)
    if source.shape != target.shape:
        raise SystemExit(f"source tokens {tuple(source.shape)} != target tokens {tuple(target.shape)}")
    result: dict = {"model": args.model, "records": len(records)}
    mean = target.mean(0, keepdim=True)
    result["target_spread"] = target.var(0).mean().item()
    result["target_norm"] = target.norm(dim=-1).mean().item()
    result["tf_mse"] = ((pred - target) ** 2).mean().item()
    result["copy_source_mse"] = ((source - target) ** 2).mean().item()
    result["mean_target_mse"] = ((mean - target) ** 2).mean().item()
    ops = [r.get("op", "other") for r in records]  # a copy set has no edit operation
    per_op = {}
    for op in sorted(set(ops)):
        idx = torch.tensor([o == op for o in ops])
        per_op[op] = {
            "n": int(idx.sum()),
            "tf_mse": ((pred[idx] - target[idx]) ** 2).mean().item(),
            "copy_source_mse": ((source[idx] - target[idx]) ** 2).mean().item(),
        }
    result["per_op"] = per_op
    images = [Image.open(r["images"][0]).convert("RGB") for r in records]
    # ShapesWorld's edit records keep the instruction apart; other editing files have it in the turn.
    instructions = [r.get("instruction") or r["conversations"][0]["value"].replace("<image>", "").strip()
                    for r in records]  # fmt: skip
    free = torch.stack(regress_tokens(pipe, instructions, sources=images, progress=False)).float()
    result["free"] = stats(free, target, source)
    result["free_mse_per_position"] = [round(x, 5) for x in ((free - target) ** 2).mean((0, 2)).tolist()]
    alone = torch.stack(regress_tokens(pipe, instructions, progress=False)).float()
    result["free_no_source"] = stats(alone, target, source)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
