"""How readable are a vision tower's tokens? Linear probes for colour and shape (issue 16's base diagnosis).

    python benchmarks/token_probe.py --model runs/qs/stage0_base/final --data runs/qs/data/shapes-tiny \
        [--n 3000]

Takes the single-object text-to-image records (canonical layout: one medium object, centred), encodes
their images with the model's tower (as training does) and fits ridge-regularised least-squares
classifiers (one-hot targets) on the concatenated tokens, for the object's colour and its shape; 80%
train / 20% held out. High held-out accuracy means the tower hands the LLM the answer linearly; low
means the LLM must recover it through non-linear work (or cannot). ``--object-token --position`` also
probes the grid row and column of the object's token (does a token say where it is? the LLM's attention
values carry no position, so position questions need it); ``majority`` is the no-information
baseline. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from orion_mllm.eval.model_eval import read_jsonl
from orion_mllm.model.orion import ORION_CONFIG_NAME, OrionModel


def ridge_accuracy(x: torch.Tensor, labels: list[str], lam: float = 1e-2) -> tuple[float, float]:
    """Train / held-out accuracy of a ridge least-squares one-hot classifier."""
    classes = sorted(set(labels))
    y = torch.nn.functional.one_hot(torch.tensor([classes.index(c) for c in labels]), len(classes)).double()
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    cut = int(0.8 * len(x))
    xt, yt = x[:cut], y[:cut]
    w = torch.linalg.solve(xt.T @ xt + lam * len(xt) * torch.eye(x.shape[1], dtype=torch.double), xt.T @ yt)
    right = (x @ w).argmax(1) == y.argmax(1)
    return right[:cut].double().mean().item(), right[cut:].double().mean().item()


def mlp_accuracy(x: torch.Tensor, labels: list[str], steps: int = 1500) -> float:
    """Held-out accuracy of a 2-layer MLP probe (same 80/20 split as the ridge probe)."""
    torch.manual_seed(0)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(c) for c in labels])
    xs = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    cut = int(0.8 * len(xs))
    net = torch.nn.Sequential(
        torch.nn.Linear(xs.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(),
        torch.nn.Linear(512, len(classes)),
    )  # fmt: skip
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(steps):
        idx = torch.randint(0, cut, (128,))
        loss = torch.nn.functional.cross_entropy(net(xs[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (net(xs[cut:]).argmax(1) == y[cut:]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="ShapesWorld folder with gen.jsonl")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument(
        "--records", choices=["gen", "und"], default="gen",
        help="gen: canonical single-object pictures (centred, medium); und: understanding pictures with "
        "one object (any size and place)",
    )  # fmt: skip
    ap.add_argument(
        "--object-token", action="store_true",
        help="probe only the token under the object's centre (not all tokens concatenated)",
    )  # fmt: skip
    ap.add_argument("--mlp", action="store_true", help="also a 2-layer MLP probe (512 wide)")
    ap.add_argument(
        "--position", action="store_true",
        help="with --object-token: also probe the token's own grid row and column (does the token say "
        "where it is? position questions need it)",
    )  # fmt: skip
    ap.add_argument(
        "--side", type=int, default=None, help="resize pictures to this side (default: generation size)"
    )
    args = ap.parse_args()
    if args.position and not args.object_token:  # checked before the (slow) encoding of every picture
        raise SystemExit("--position needs --object-token (it probes the object's own token)")
    if (args.model / ORION_CONFIG_NAME).is_file():
        model = OrionModel.from_pretrained(args.model).eval()
    else:  # a stage-0 export (plain Qwen2.5-VL directory): only its tower is probed
        model = OrionModel.from_qwen(args.model).eval()
    records = [r for r in read_jsonl(args.data / f"{args.records}.jsonl") if len(r["scene"]["objects"]) == 1]
    records = records[: args.n]
    side = args.side or model.config.image_spec.gen_image_size
    processor = model.processor.image_processor
    tokens, cells = [], []
    with torch.no_grad():
        for start in range(0, len(records), 64):
            chunk = records[start : start + 64]
            images = [Image.open(args.data / r["image"]).convert("RGB").resize((side, side)) for r in chunk]
            out = processor(images=images, return_tensors="pt")
            flat = model.encode_images(out["pixel_values"], out["image_grid_thw"]).float()
            if args.object_token:
                grid = flat.reshape(len(chunk), side // 16, side // 16, -1)
                for r, g in zip(chunk, grid, strict=True):
                    o, n = r["scene"]["objects"][0], grid.shape[1]
                    row, col = min(int(o["y"] * n), n - 1), min(int(o["x"] * n), n - 1)
                    tokens.append(g[row, col][None])
                    cells.append({"row": str(row), "col": str(col)})
            else:
                tokens.append(flat.reshape(len(chunk), -1))
    x = torch.cat(tokens)
    result = {"model": str(args.model), "records": args.records, "n": len(records), "side": side,
              "features": x.shape[1]}  # fmt: skip
    keys = ("colour", "shape", "row", "col") if args.position else ("colour", "shape")
    for key in keys:
        if key in ("row", "col"):
            labels = [c[key] for c in cells]
        else:
            labels = [r["scene"]["objects"][0][key] for r in records]
        train, held = ridge_accuracy(x, labels)
        majority = max(labels.count(c) for c in set(labels)) / len(labels)  # the no-information baseline
        result[key] = {"train": round(train, 4), "heldout": round(held, 4), "classes": len(set(labels)),
                       "majority": round(majority, 4)}  # fmt: skip
        if args.mlp:
            result[key]["mlp_heldout"] = round(mlp_accuracy(x, labels), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
