"""A base model's vision tower (and merger) under a freshly initialised LLM, optionally of another depth.

Stage 0 trains only the LLM on a frozen tower. To ask what limits the base's understanding (the
LLM's size, its data, its steps) without re-training the tower (22 minutes here), this copies the
tower of an existing base under a random LLM built like the preset's, with the number of layers,
MLP width or heads changed; then stage 0 runs from it:

    python benchmarks/fresh_llm.py bases/tiny/final runs/exp/fresh-L8 --layers 8
    orion train recipes/shapes/tiny/stage0_base.yaml --output runs/exp/s0-L8 \
        model.init=runs/exp/fresh-L8 model.standardize_tokens_images=0 model.tower_pretrain=null

With the preset's own shape and seed the LLM's initial weights are those the committed base started
from (the backbone is built from the same seed), so the committed base is the control.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from orion_mllm.config import get_preset
from orion_mllm.model.backbone import build_backbone, load_backbone, save_processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="a stage-0 base (Qwen2.5-VL directory) whose tower is kept")
    ap.add_argument("out", type=Path, help="where the new model is written")
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the preset's)")
    ap.add_argument("--intermediate", type=int, default=None, help="LLM MLP width (default: the preset's)")
    ap.add_argument("--kv-heads", type=int, default=None, help="LLM key/value heads (default: the preset's)")
    ap.add_argument("--preset", default="tiny", help="the base's architecture preset")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    base, processor = load_backbone(args.base)
    preset = get_preset(args.preset)
    text = preset.text
    if args.layers is not None:
        text = dataclasses.replace(text, num_hidden_layers=args.layers)
    if args.intermediate is not None:
        text = dataclasses.replace(text, intermediate_size=args.intermediate)
    if args.kv_heads is not None:
        text = dataclasses.replace(text, num_key_value_heads=args.kv_heads)
    preset = dataclasses.replace(preset, text=text)
    backbone, _ = build_backbone(preset, seed=args.seed)
    visual = base.model.visual.state_dict()
    backbone.model.visual.load_state_dict(visual, strict=True)
    n_llm = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("model.visual"))
    args.out.mkdir(parents=True, exist_ok=False)
    backbone.save_pretrained(args.out, safe_serialization=True)
    save_processor(processor, args.out)
    reloaded, _ = load_backbone(args.out)
    with torch.no_grad():
        same = all(
            torch.equal(a, b)
            for a, b in zip(reloaded.model.visual.state_dict().values(), visual.values(), strict=True)
        )
    print(
        json.dumps(
            {
                "out": str(args.out),
                "llm_params": n_llm,
                "layers": text.num_hidden_layers,
                "intermediate": text.intermediate_size,
                "kv_heads": text.num_key_value_heads,
                "tower_copied": same,
            }
        )
    )


if __name__ == "__main__":
    main()
