"""Benchmark one full ORION optimizer step, packed vs unpacked: tokens/s, padding share, memory, MFU.

One step is the trainer's own step function, ``orion_mllm.train.step.train_step`` (what
``Trainer._train_step`` runs once it has read the step's data), in stage 2 (LLM + vision head
trainable, vision tower frozen, CE:MSE:KL = 1:1:0.01): for every micro-batch, the frozen vision tower
encodes the images, the student runs forward (CE at text targets, MSE + KL at visual positions
against a frozen ``KLTeacher``, ``make_teacher(model)``), ``losses.step_loss`` weighs each term by the
micro-batch's share of the step's targets, backward; then the gradient norm is clipped to 1.0 and
AdamW (0.9, 0.95, eps 1e-15, weight decay 0.1 on matrices) steps. Data loading is not timed (the trainer
encodes the next step in a background thread): a fixed mixture of ShapesWorld understanding,
generation and editing records (one global batch) is encoded once and batched two ways:

- ``packed``: first-fit-decreasing into rows of at most ``--pack-tokens`` tokens, one row per
  micro-batch (as the trainer does with ``train.packing: true``);
- ``unpacked``: ``--micro-batch`` samples per micro-batch, right-padded to the longest one.

Each mode runs ``--warmup`` untimed steps, then ``--steps`` timed steps over the same global batch.
Reported per mode: tokens/s = real (non-padding) tokens per step / seconds per step; padding share =
padding slots / all [rows x width] slots; peak memory (CUDA: ``max_memory_allocated`` over the timed
steps; CPU: the process's peak resident memory ``VmHWM``, reset before the timed steps, so it includes
weights, optimizer state and the torch runtime); MFU on CUDA.

MFU = model FLOPs per step / step seconds / peak dense bf16 FLOP/s (``--peak-tflops``; 989 for
H100/H200 SXM). Model FLOPs per step, with T = real tokens, n_txt = CE target positions, n_vis =
visual positions (MSE and KL), P = image patches (before the 2x2 merge), d = hidden, V = vocabulary:

    6 * N_body * T                    student LLM forward + backward; N_body = decoder layers + final
                                      norm (embeddings excluded: a lookup, no FLOPs)
  + 6 * V * d * (n_txt + n_vis)       student LM head: logits are formed only at the CE and KL
                                      positions (chunked), never at every token
  + 6 * N_head * n_vis                vision head (MSE)
  + 2 * N_body * T + 2 * V * d * n_vis    frozen teacher: forward only, LM head at visual positions
  + 2 * N_tower * P + 2 * N_merger * P / merge^2   frozen vision tower + merger, forward only

Attention score FLOPs (~ 4 * layers * d * sum of squared sample lengths, forward) are left out of
the model FLOPs: samples are a few hundred tokens, so they are small; FLOPs spent on padding are not
model FLOPs (that is what packing saves). On CPU MFU is null. But *computed* attention is reported
apart ("attn pairs x" = query-key pairs scored / pairs inside samples, and ``attention_flops_*``):
with ``sdpa`` a packed row is run with a dense block-diagonal mask, so every [width x width] pair is
scored, which for short samples in long rows can cost more than packing saves (only a varlen kernel,
``--attn flash_attention_2``, skips the pairs across samples).

    python benchmarks/train_step.py                              # tiny preset, CPU or CUDA (auto)
    python benchmarks/train_step.py --preset qwen2.5-vl-3b --device cuda      # random weights, bf16 autocast
    python benchmarks/train_step.py --preset qwen2.5-vl-3b --device cuda --master-dtype bf16   # less memory

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from proc_memory import reset_peak_rss, status_mib  # benchmarks/ is the script folder

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from orion_mllm.config import get_preset  # noqa: E402
from orion_mllm.data.packing import collate_packed, pack_first_fit_decreasing  # noqa: E402
from orion_mllm.data.records import encode_record  # noqa: E402
from orion_mllm.data.shapes.datasets import write_shapes_dataset  # noqa: E402
from orion_mllm.kernels.liger import liger_available  # noqa: E402
from orion_mllm.losses import LossWeights  # noqa: E402
from orion_mllm.model.orion import OrionModel  # noqa: E402
from orion_mllm.model.teacher import KLTeacher, make_teacher  # noqa: E402
from orion_mllm.sequence import Batch, EncodedConversation, collate  # noqa: E402
from orion_mllm.train.batches import text_targets, visual_targets  # noqa: E402
from orion_mllm.train.distributed import DistState  # noqa: E402
from orion_mllm.train.step import train_step as trainer_step  # noqa: E402
from orion_mllm.train.trainer import param_groups  # noqa: E402

MIB = 1024**2
# Per-preset defaults: (global batch, pack tokens). The generation image size comes from the preset.
DEFAULTS = {
    "micro": (64, 1024),
    "tiny": (64, 2048),
    "qwen2.5-vl-3b": (64, 8192),
    "qwen2.5-vl-7b": (64, 8192),
}
# Peak dense bf16 tensor FLOP/s by device-name substring (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))
STAGE2_WEIGHTS = LossWeights(ce=1.0, mse=1.0, kl=0.01)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def _mixture(n: int) -> list[str]:
    """A fixed interleaved task order: 3 understanding : 3 generation : 2 editing."""
    pattern = ["und", "gen", "edit", "und", "gen", "und", "gen", "edit"]
    return [pattern[i % len(pattern)] for i in range(n)]


def load_records(root: Path, tasks: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The i-th record of each task's JSONL, in mixture order, with image paths made absolute."""
    files = {
        t: [json.loads(line) for line in (root / f"{t}.jsonl").read_text().splitlines() if line]
        for t in set(tasks)
    }
    taken = dict.fromkeys(files, 0)
    out = []
    for t in tasks:
        rec = dict(files[t][taken[t]])
        taken[t] += 1
        for key in ("images", "image"):
            v = rec.get(key)
            if isinstance(v, str):
                rec[key] = str(root / v)
            elif isinstance(v, list):
                rec[key] = [str(root / p) for p in v]
        out.append((f"{t}.jsonl:{taken[t]}", rec))
    return out


def build_micro_batches(
    items: list[EncodedConversation], mode: str, pad_id: int, pack_tokens: int, micro_batch: int
) -> list[Batch]:
    if mode == "packed":
        too_long = [x.record_id for x in items if len(x) > pack_tokens]
        if too_long:
            raise SystemExit(f"samples longer than --pack-tokens={pack_tokens}: {too_long[:5]}")
        bins = pack_first_fit_decreasing([len(x) for x in items], pack_tokens)
        return [collate_packed([[items[i] for i in b]], pad_id) for b in bins]
    return [collate(items[i : i + micro_batch], pad_id) for i in range(0, len(items), micro_batch)]


def model_flops(model: OrionModel, teacher: KLTeacher, batches: list[Batch]) -> dict[str, float]:
    """FLOPs of one step by the formula in the module docstring (only real tokens count)."""
    bb = model.backbone
    lm = bb.model.language_model
    d = model.hidden_size
    vocab = bb.lm_head.weight.shape[0]
    n_body = _numel(lm) - _numel(lm.embed_tokens)
    t_lm = teacher.backbone.model.language_model
    n_body_t = _numel(t_lm) - _numel(t_lm.embed_tokens)
    visual = bb.model.visual
    n_merger = _numel(visual.merger)
    n_tower = _numel(visual) - n_merger
    merge = int(model.config.image_spec.merge_size)
    tokens = sum(b.num_real_tokens for b in batches)
    n_txt = sum(text_targets(b) for b in batches)
    n_vis = sum(visual_targets(b) for b in batches)
    patches = sum(int(b.pixel_values.shape[0]) for b in batches if b.pixel_values is not None)
    parts = {
        "student_llm": 6.0 * n_body * tokens,
        "student_lm_head": 6.0 * vocab * d * (n_txt + n_vis),
        "vision_head": 6.0 * _numel(model.vision_head) * n_vis,
        "teacher": 2.0 * n_body_t * tokens + 2.0 * vocab * d * n_vis,
        "vision_tower": 2.0 * n_tower * patches + 2.0 * n_merger * patches / merge**2,
    }
    parts["total"] = sum(parts.values())
    return parts


def attention_pairs(items: list[EncodedConversation], batches: list[Batch]) -> dict[str, float]:
    """Query-key pairs per layer: what a dense-mask kernel computes vs what the samples need.

    SDPA with a mask (padding, or the block-diagonal mask of a packed row) scores every pair of the
    [width x width] square; only pairs inside one sample are needed. A varlen kernel (flash-attention
    with packed position_ids) computes only those. Both counted as full squares (causality ignored).
    """
    computed = sum(int(b.input_ids.shape[0]) * int(b.input_ids.shape[1]) ** 2 for b in batches)
    useful = sum(len(x) ** 2 for x in items)
    return {"computed": computed, "useful": useful, "ratio": computed / useful if useful else 0.0}


# --------------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------------


def train_step(
    model: OrionModel,
    teacher: KLTeacher,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    micro_batches: list[Batch],
    device: torch.device,
    autocast,
) -> dict[str, float]:
    """The trainer's step (``orion_mllm.train.step.train_step``) on one process, always applied."""
    return trainer_step(
        model,
        teacher,
        micro_batches,
        optimizer,
        trainable,
        STAGE2_WEIGHTS,
        dist=DistState(rank=0, local_rank=0, world_size=1, device=device),
        step_text=sum(text_targets(b) for b in micro_batches),
        step_visual=sum(visual_targets(b) for b in micro_batches),
        autocast=autocast,
        grad_clip=1.0,
    )


def run_mode(
    mode: str,
    items: list[EncodedConversation],
    micro_batches: list[Batch],
    model: OrionModel,
    teacher: KLTeacher,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    device: torch.device,
    autocast,
    args: argparse.Namespace,
    peak_flops: float | None,
) -> dict[str, Any]:
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    real = sum(b.num_real_tokens for b in micro_batches)
    slots = sum(int(b.input_ids.numel()) for b in micro_batches)
    result: dict[str, Any] = {
        "micro_batches": len(micro_batches),
        "rows": sum(int(b.input_ids.shape[0]) for b in micro_batches),
        "max_width": max(int(b.input_ids.shape[1]) for b in micro_batches),
        "real_tokens": real,
        "slots": slots,
        "padding_share": 1.0 - real / slots if slots else 0.0,
        "text_targets": sum(text_targets(b) for b in micro_batches),
        "visual_targets": sum(visual_targets(b) for b in micro_batches),
    }
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        train_step(model, teacher, optimizer, trainable, micro_batches, device, autocast)
    sync()
    result["warmup_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        result["peak_reset"] = reset_peak_rss()
    times, losses = [], []
    for i in range(args.steps):
        sync()
        t0 = time.perf_counter()
        stats = train_step(model, teacher, optimizer, trainable, micro_batches, device, autocast)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(stats)
        print(
            f"  {mode:>8} step {i + 1}/{args.steps}: {times[-1]:.3f} s, loss {stats['loss']:.4f} "
            f"(ce {stats['ce']:.4f} mse {stats['mse']:.4f} kl {stats['kl']:.5f}) "
            f"grad_norm {stats['grad_norm']:.3f}",
            flush=True,
        )
    step_s = sorted(times)[len(times) // 2]  # median: robust to a one-off hiccup
    result.update(
        step_s=step_s,
        step_s_mean=sum(times) / len(times),
        step_s_min=min(times),
        step_s_all=times,
        tokens_per_s=real / step_s,
        samples_per_s=args.global_batch / step_s,
        last_loss=losses[-1],
        peak_mem_mib=(torch.cuda.max_memory_allocated(device) / MIB) if cuda else status_mib("VmHWM"),
    )
    attn = attention_pairs(items, micro_batches)
    # Score + weighted sum (2 matmuls, 2 FLOPs per MAC) over the attention width (heads x head_dim):
    # x3 for the student (forward + backward), x1 for the teacher forward.
    layers = model.backbone.config.text_config.num_hidden_layers
    per_pair = 4.0 * layers * model.hidden_size * (3 + 1)
    result["attention_pairs"] = attn
    result["attention_flops_computed"] = per_pair * attn["computed"]
    result["attention_flops_useful"] = per_pair * attn["useful"]
    flops = model_flops(model, teacher, micro_batches)
    result["model_flops_per_step"] = flops
    result["achieved_tflops"] = flops["total"] / step_s / 1e12
    result["mfu"] = flops["total"] / step_s / peak_flops if (cuda and peak_flops) else None
    return result


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(modes: dict[str, dict[str, Any]]) -> str:
    header = [
        "mode",
        "micro-batches",
        "max width",
        "real tokens",
        "slots",
        "padding",
        "step s",
        "tokens/s",
        "attn pairs x",
        "peak MiB",
        "TFLOP/s",
        "MFU",
    ]
    lines = [header]
    for name, r in modes.items():
        lines.append(
            [
                name,
                str(r["micro_batches"]),
                str(r["max_width"]),
                str(r["real_tokens"]),
                str(r["slots"]),
                f"{100 * r['padding_share']:.1f}%",
                f"{r['step_s']:.3f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['attention_pairs']['ratio']:.1f}",
                _fmt(r["peak_mem_mib"], ",.0f"),
                f"{r['achieved_tflops']:.3f}",
                "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for i, row in enumerate(lines):
        out.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULTS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--global-batch", type=int, default=None, help="samples per step (default: 64)")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per unpacked micro-batch")
    parser.add_argument(
        "--pack-tokens", type=int, default=None, help="packed row budget (tiny 2048, 3b 8192)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--modes", nargs="+", default=["packed", "unpacked"], choices=["packed", "unpacked"])
    parser.add_argument(
        "--master-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="student parameter (and AdamW state) dtype; bf16 saves memory",
    )
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s for MFU (default by GPU name: H100/H200 = 989)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    preset = get_preset(args.preset)
    gb_default, pack_default = DEFAULTS[args.preset]
    args.global_batch = args.global_batch or gb_default
    args.pack_tokens = args.pack_tokens or pack_default
    master_dtype = torch.bfloat16 if args.master_dtype == "bf16" else torch.float32
    # As the trainer: bf16 autocast on CUDA (fp32 master weights), plain fp32 on CPU.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    teacher_dtype = torch.bfloat16 if cuda else master_dtype
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    machine = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        import transformers

        machine["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - orion_mllm needs it anyway
        machine["transformers"] = None
    kl_backend = "liger" if cuda and liger_available() else "chunked"
    print(f"machine: {json.dumps(machine)}", flush=True)

    # ---- data: one global batch of ShapesWorld records, encoded once
    tasks = _mixture(args.global_batch)
    counts = {t: tasks.count(t) for t in ("und", "gen", "edit")}
    with tempfile.TemporaryDirectory(prefix="orion-train-step-") as tmp:
        t0 = time.perf_counter()
        write_shapes_dataset(
            tmp,
            size=preset.gen_image_size,
            n_und=counts["und"],
            n_gen=counts["gen"],
            n_edit=counts["edit"],
            n_interleaved=0,
            n_heldout=0,
            seed=args.seed,
            progress=False,
        )
        records = load_records(Path(tmp), tasks)
        data_s = time.perf_counter() - t0

        # ---- model, teacher, optimizer (stage 2: LLM + head trainable, vision tower frozen)
        t0 = time.perf_counter()
        model = OrionModel.from_preset(
            args.preset, seed=args.seed, attn_implementation=args.attn, dtype=master_dtype
        )
        builder = model.sequence_builder()
        items = [encode_record(builder, rec, record_id=rid) for rid, rec in records]
    # The base model, frozen, built before any step (the trainer loads the same thing from disk).
    teacher = make_teacher(model).to(teacher_dtype)
    model.requires_grad_(False)
    model.backbone.model.language_model.requires_grad_(True)
    model.backbone.lm_head.requires_grad_(True)
    model.vision_head.requires_grad_(True)
    model.to(device)
    teacher.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95), eps=1e-15, foreach=True
    )
    setup_s = time.perf_counter() - t0
    pad_id = model.processor.tokenizer.pad_token_id
    lengths = sorted(len(x) for x in items)
    lm = model.backbone.model.language_model
    params = {
        "total": _numel(model),
        "trainable": sum(p.numel() for p in trainable),
        "llm_body": _numel(lm) - _numel(lm.embed_tokens),
        "embeddings": _numel(lm.embed_tokens),
        "lm_head": model.backbone.lm_head.weight.numel(),
        "tied_embeddings": model.backbone.lm_head.weight is lm.embed_tokens.weight,
        "vision_head": _numel(model.vision_head),
        "vision_tower": _numel(model.backbone.model.visual),
        "teacher": _numel(teacher),
    }
    peak_flops = _peak_flops(device, args.peak_tflops)
    print(
        f"preset {args.preset}: {params['total']:,} parameters ({params['trainable']:,} trainable), "
        f"master {args.master_dtype}, teacher {str(teacher_dtype).removeprefix('torch.')}, "
        f"autocast {'bf16' if cuda else 'off'}, attention {args.attn}, KL backend {kl_backend}\n"
        f"data: {len(items)} samples ({counts}), lengths min/median/max "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}, {sum(lengths):,} tokens; "
        f"written in {data_s:.1f} s; model + encode + teacher in {setup_s:.1f} s",
        flush=True,
    )

    modes: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        batches = build_micro_batches(items, mode, pad_id, args.pack_tokens, args.micro_batch)
        widths = [int(b.input_ids.shape[1]) for b in batches]
        print(f"{mode}: {len(batches)} micro-batch(es), widths {widths}", flush=True)
        modes[mode] = run_mode(
            mode, items, batches, model, teacher, optimizer, trainable, device, autocast, args, peak_flops
        )

    print()
    print(_table(modes))
    summary: dict[str, Any] = {
        "benchmark": "orion train step (stage 2: CE+MSE+KL, backward, clip, AdamW)",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "preset": args.preset,
        "device": str(device),
        "torch": torch.__version__,
        "master_dtype": args.master_dtype,
        "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        "autocast": "bf16" if cuda else None,
        "attn_implementation": args.attn,
        "kl_backend": kl_backend,
        "loss_weights": {"ce": STAGE2_WEIGHTS.ce, "mse": STAGE2_WEIGHTS.mse, "kl": STAGE2_WEIGHTS.kl},
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "pack_tokens": args.pack_tokens,
        "gen_image_size": preset.gen_image_size,
        "samples": counts,
        "sample_tokens": {
            "min": lengths[0],
            "median": lengths[len(lengths) // 2],
            "max": lengths[-1],
            "sum": sum(lengths),
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "params": params,
        "peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - t_start,
        "modes": modes,
    }
    if "packed" in modes and "unpacked" in modes:
        packed, unpacked = modes["packed"]["tokens_per_s"], modes["unpacked"]["tokens_per_s"]
        summary["packed_speedup_tokens_per_s"] = packed / unpacked
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
