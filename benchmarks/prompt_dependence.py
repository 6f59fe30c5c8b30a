"""How much does a model's visual-token regression depend on the prompt? (issue 16's diagnosis)

    python benchmarks/prompt_dependence.py --model runs/qs/model --data runs/qs/data/shapes-tiny \
        [--records 64] [--gen-every 4] [--out runs/diag]

On the first ``--records`` text-to-image training records with distinct captions:
- teacher-forced MSE with the true captions vs with the captions shuffled across records (the true
  previous visual tokens are fed either way): equal numbers mean the head ignores the prompt when it
  can copy from the previous tokens;
- free-running (the model's own tokens fed back, as at inference): MSE to the record's own target vs
  to the other records' targets, the spread of the outputs across prompts vs the targets' spread, and
  the same per grid position (first token = predicted from the text alone);
- optionally free-running ``shapes-gen`` on every ``--gen-every``-th prompt of the 552 (0: skip).

Prints one JSON object last (all numbers above).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from orion_mllm.data.sources import ConversationSource
from orion_mllm.eval.model_eval import eval_generation, regress_tokens, teacher_forced_tokens
from orion_mllm.eval.shapes_gen import prompt_set
from orion_mllm.inference.pipeline import OrionPipeline


def distinct_records(root: Path, n: int) -> list[dict]:
    src = ConversationSource("gen", "generation", root / "gen.jsonl", root)
    seen, out = set(), []
    for i in range(len(src)):
        rec = src.get(i).record
        cap = rec["conversations"][0]["value"]
        if cap in seen:
            continue
        seen.add(cap)
        out.append(rec)
        if len(out) == n:
            break
    return out


def teacher_forced(pipe: OrionPipeline, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced predictions [R, N, d] and the true tokens [R, N, d]."""
    pred, enc = teacher_forced_tokens(pipe, records)
    n = enc[0].visual_tokens.shape[0]
    return pred.view(len(records), n, -1), torch.stack([e.visual_tokens.float() for e in enc])


def swap_captions(records: list[dict], seed: int = 0) -> list[dict]:
    """Each record with another record's caption (a derangement), its own image kept."""
    order = list(range(len(records)))
    rng = random.Random(seed)
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    out = []
    for rec, j in zip(records, order, strict=True):
        conv = [dict(t) for t in rec["conversations"]]
        conv[0]["value"] = records[j]["conversations"][0]["value"]
        out.append({**rec, "conversations": conv})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ORION model directory (with decoder/ for --gen-every)")
    ap.add_argument("--data", required=True, help="ShapesWorld training data root (gen.jsonl)")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--gen-every", type=int, default=4, help="score every k-th shapes-gen prompt (0: skip)")
    ap.add_argument("--guidance", type=float, default=1.0, help="token-space CFG weight for free running")
    ap.add_argument("--out", default=None, help="where shapes-gen images go (default: a temp folder)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    pipe = OrionPipeline.load(args.model, image_separator="\n")
    records = distinct_records(Path(args.data), args.records)
    result: dict = {"model": args.model, "records": len(records), "guidance": args.guidance}

    pred, true = teacher_forced(pipe, records)
    pred_swapped, _ = teacher_forced(pipe, swap_captions(records))
    var = true.var(0).mean().item()  # the targets' spread across records, per position and dim
    result["target_spread"] = var
    result["tf_mse"] = ((pred - true) ** 2).mean().item()
    result["tf_mse_swapped_captions"] = ((pred_swapped - true) ** 2).mean().item()

    captions = [r["conversations"][0]["value"] for r in records]
    free = torch.stack(regress_tokens(pipe, captions, progress=False, guidance=args.guidance)).float()
    own = ((free - true) ** 2).mean((1, 2))
    cross = ((free[:, None] - true[None]) ** 2).mean((2, 3))  # [R outputs, R targets]
    other = (cross.sum(1) - cross.diagonal()) / (len(records) - 1)
    result["free_mse_own"] = own.mean().item()
    result["free_mse_other"] = other.mean().item()
    result["free_nearest_is_own"] = (cross.argmin(1) == torch.arange(len(records))).float().mean().item()
    result["free_spread"] = free.var(0).mean().item()
    result["free_mse_per_position"] = [round(x, 5) for x in ((free - true) ** 2).mean((0, 2)).tolist()]
    result["free_spread_per_position"] = [round(x, 5) for x in free.var(0).mean(1).tolist()]
    result["target_spread_per_position"] = [round(x, 5) for x in true.var(0).mean(1).tolist()]
    result["mean_image_mse"] = ((true.mean(0, keepdim=True) - true) ** 2).mean().item()

    if args.gen_every and pipe.decoder is not None:
        prompts = prompt_set()[:: args.gen_every]
        out = Path(args.out or f"/tmp/prompt_dependence_{int(t0)}") / "shapes-gen"
        scores = eval_generation(pipe, out, prompts=prompts, progress=False, guidance=args.guidance)
        result["shapes_gen_subset"] = {k: round(v, 4) for k, v in scores.items()}
        result["shapes_gen_prompts"] = len(prompts)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
