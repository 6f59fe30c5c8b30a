"""What a model answers about its own drawings (issue 16's interleaved target) and what it says first.

    python benchmarks/interleaved_answers.py --model runs/qs/model --data runs/qs/data/eval [--n 50]

Runs the quickstart's interleaved evaluation (``eval.model_eval.eval_interleaved``: draw, then answer a
question with the drawing in context; and the same with each drawing swapped for the next dialogue's)
on the first ``--n`` dialogues of ``DATA/interleaved.jsonl``, and, for the same prompts, the text
head's distribution over the first answer token: the mean probability of ``<|vision_end|>`` (a token
only the engine writes; session 9 found a longer-trained model putting most of its mass there) and
the most likely token per dialogue.

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from orion_mllm.eval.model_eval import eval_interleaved, read_jsonl, regress_tokens
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, GeneratedImage


@torch.no_grad()
def first_token(pipe: OrionPipeline, records: list[dict], tokens: list[torch.Tensor]) -> dict:
    eng = pipe.engine
    tok = eng.tokenizer
    p_end, top = [], Counter()
    for r, t in zip(records, tokens, strict=True):
        s = ChatSession()
        s.add("user", [r["conversations"][0]["value"]])
        s.add("assistant", [GeneratedImage(t)])
        s.add("user", [r["conversations"][2]["value"]])
        p = pipe.prompt(s)
        embeds = eng._embed(p.input_ids).clone()
        embeds[p.input_ids == eng.image_pad_id] = p.visual_tokens.to(embeds.dtype)
        hidden = eng.lm(inputs_embeds=embeds[None], position_ids=p.position_ids[:, None]).last_hidden_state
        probs = torch.softmax(eng.lm_head(hidden[0, -1]).float(), -1)
        p_end.append(float(probs[eng.vision_end_id]))
        top[tok.decode([int(probs.argmax())])] += 1
    return {"p_vision_end_mean": sum(p_end) / len(p_end), "top_first_token": dict(top.most_common(5))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ORION model directory")
    ap.add_argument("--data", required=True, help="ShapesWorld folder with interleaved.jsonl (the eval set)")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    t0 = time.time()
    pipe = OrionPipeline.load(args.model, image_separator="\n")
    records = read_jsonl(f"{args.data}/interleaved.jsonl")[: args.n]
    result, dialogues = eval_interleaved(pipe, records, progress=False)
    # Accuracy by the gold answer (0: a shape the prompt does not name; 1: a named one; 2-4: counting),
    # with the drawings in place and swapped: which answers come from the picture.
    by_gold: dict[str, list[int]] = {}
    for d in dialogues:
        hits = by_gold.setdefault(d["gold"], [0, 0, 0])
        hits[0] += 1
        hits[1] += d["right"]
        hits[2] += d["right_swapped"]
    result["by_gold"] = {
        g: {"n": n, "right": r / n, "swapped": s / n} for g, (n, r, s) in sorted(by_gold.items())
    }
    tokens = regress_tokens(pipe, [r["conversations"][0]["value"] for r in records], progress=False)
    result.update(first_token(pipe, records, tokens))
    print(json.dumps({"model": args.model, **result, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
