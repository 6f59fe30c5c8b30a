"""``orion eval ...``: the ShapesWorld benchmarks (shapes-gen, -score, -und, -edit) and drift."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _print_scores(scores: dict[str, float]) -> None:
    from orion_mllm.data.shapes.scorer import CATEGORIES

    for category in CATEGORIES:
        if category in scores:
            print(f"  {category:14s} {scores[category]:.4f}")
    print(f"  {'overall':14s} {scores['overall']:.4f}  ({int(scores['samples'])} samples)")
    print(json.dumps(scores))


def _cmd_eval_shapes_gen(args: argparse.Namespace) -> int:
    from orion_mllm.eval.shapes_gen import prompt_set, score_folder, write_oracle

    if args.oracle == bool(args.model):
        raise ValueError("give either --model DIR (score a model) or --oracle (score ground-truth renders)")
    if args.oracle:
        n = write_oracle(args.out, size=args.size, seed=args.seed, samples=args.samples)
        print(f"wrote {n} prompts with oracle renders to {args.out}")
        _print_scores(score_folder(args.out))
        return 0
    from orion_mllm.eval.model_eval import eval_generation, training_captions

    if args.guidance is not None and not args.guidance >= 0:
        raise ValueError(f"--guidance {args.guidance}: must be >= 0 (1: no guidance)")
    seen = training_captions(args.train_gen) if args.train_gen else None
    pipe = _eval_pipeline(args, need_decoder=True)
    scores = eval_generation(
        pipe, args.out, prompts=prompt_set(args.seed), batch_size=args.batch_size, guidance=args.guidance,
        training=seen,
    )  # fmt: skip
    _print_scores(scores)
    return 0


def _eval_pipeline(args: argparse.Namespace, *, need_decoder: bool = False):
    """A pipeline for the ShapesWorld benchmarks: their data is LLaVA-form ("<image>\\n" + text), also
    for a plain-Qwen stage-0 base trained on it."""
    from orion_mllm.inference.pipeline import NO_DECODER, OrionPipeline

    pipe = OrionPipeline.load(
        args.model, getattr(args, "decoder", None), device=args.device, image_separator="\n"
    )
    if need_decoder and pipe.decoder is None:
        raise ValueError(NO_DECODER)
    return pipe


def _eval_records(args: argparse.Namespace, pipe, name: str) -> tuple[list, Path]:
    from orion_mllm.eval.model_eval import eval_set, read_jsonl

    size = args.size or pipe.model.config.image_spec.gen_image_size
    root = Path(args.data or f"data/shapes-eval-{size}")
    eval_set(root, size=size, n_und=max(args.n, 200), n_edit=max(args.n, 200))
    records = read_jsonl(root / f"{name}.jsonl")[: args.n]
    return records, root


def _cmd_eval_shapes_und(args: argparse.Namespace) -> int:
    from orion_mllm.eval.model_eval import eval_understanding

    pipe = _eval_pipeline(args)
    records, root = _eval_records(args, pipe, "und")
    scores = eval_understanding(pipe, records, root, batch_size=args.batch_size)
    for k, v in scores.items():
        print(f"  {k:14s} {v:.4f}" if k != "questions" else f"  {k:14s} {v}")
    print(json.dumps(scores))
    return 0


def _cmd_eval_shapes_edit(args: argparse.Namespace) -> int:
    from orion_mllm.eval.model_eval import eval_editing

    pipe = _eval_pipeline(args, need_decoder=True)
    records, root = _eval_records(args, pipe, "edit")
    scores = eval_editing(pipe, records, root, batch_size=args.batch_size, save_dir=args.out)
    for k, v in scores.items():
        print(f"  {k:14s} {v:.4f}" if k != "edits" else f"  {k:14s} {v}")
    print(json.dumps(scores))
    return 0


def _cmd_eval_drift(args: argparse.Namespace) -> int:
    import torch

    from orion_mllm.eval.model_eval import eval_set
    from orion_mllm.inference.pipeline import load_model
    from orion_mllm.workflow.evaluate import measure_drift

    model, _ = load_model(args.model, torch.device("cpu"), torch.float32)
    images = args.images
    if images is None:
        size = args.size or model.config.image_spec.gen_image_size
        root = eval_set(
            args.data or f"data/shapes-eval-{size}", size=size, n_und=0, n_edit=0, n_interleaved=0
        )
        images = root / "heldout_gen.jsonl"
    summary = measure_drift(args.base, model, images, args.out, args.n, k=args.top_k)
    print((Path(args.out) / "drift.md").read_text())
    print(json.dumps(summary))
    return 0


def _cmd_eval_shapes_score(args: argparse.Namespace) -> int:
    from orion_mllm.eval.shapes_gen import score_folder

    _print_scores(score_folder(args.images))
    return 0


def eval_model_options(p: argparse.ArgumentParser, n: int) -> None:
    """The options of the benchmarks that run a model on the held-out set (``shapes-und``, ``-edit``)."""
    p.add_argument("--model", required=True, help="model directory (ORION, or a plain Qwen2.5-VL base)")
    p.add_argument(
        "--data", default=None, help="held-out ShapesWorld eval set (default: data/shapes-eval-SIZE, "
        "written on first use with a seed no training recipe uses)",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=n, help=f"records to evaluate (default: {n})")
    p.add_argument(
        "--size", type=int, default=None, help="ShapesWorld image side the model was trained on "
        "(default: the model's generation size; give it for a plain-Qwen stage-0 base)",
    )  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)


def add_eval(sub: argparse._SubParsersAction) -> None:
    """``orion eval`` and its subcommands."""
    evals = sub.add_parser("eval", help="benchmarks on ShapesWorld")
    eval_sub = evals.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("shapes-gen", help="GenEval-style prompt set in GenEval's layout, scored")
    p.add_argument("--model", default=None, help="ORION model directory to generate with (decoder inside)")
    p.add_argument("--decoder", default=None, help="decoder directory (default: MODEL/decoder)")
    p.add_argument("--oracle", action="store_true", help="render the ground-truth scenes (scorer self-check)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--out", required=True, help="output folder (<out>/<index>/metadata.jsonl, samples/<k>.png)"
    )
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--samples", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="prompt-set seed (default: 0, the fixed set)")
    p.add_argument("--guidance", type=float, default=None, help="token-space guidance (default: the model's)")
    p.add_argument(
        "--train-gen", default=None,
        help="the model's training gen.jsonl: also score the prompts whose caption it never saw",
    )  # fmt: skip
    p.set_defaults(func=_cmd_eval_shapes_gen)
    p = eval_sub.add_parser("shapes-score", help="score a GenEval-layout folder of images")
    p.add_argument(
        "--images", required=True, help="folder with <index>/metadata.jsonl and <index>/samples/*.png"
    )
    p.set_defaults(func=_cmd_eval_shapes_score)
    p = eval_sub.add_parser(
        "shapes-und", help="understanding accuracy of a model (circular MCQ, short answers)"
    )
    eval_model_options(p, 1000)  # the quickstart's size (workflow.evaluate.EvalSizes.und)
    p.set_defaults(func=_cmd_eval_shapes_und)
    p = eval_sub.add_parser("shapes-edit", help="editing accuracy of a model (recolour/add/remove/move/swap)")
    eval_model_options(p, 200)
    p.add_argument("--decoder", default=None, help="decoder directory (default: MODEL/decoder)")
    p.add_argument("--out", default=None, help="folder for the edited images")
    p.set_defaults(func=_cmd_eval_shapes_edit)
    p = eval_sub.add_parser(
        "drift", help="semantic drift (Figure 3): text-head top-k and KL(base || model) at visual positions"
    )
    p.add_argument("--base", required=True, help="the base model (the KL teacher), e.g. the stage-0 export")
    p.add_argument("--model", required=True, help="the trained ORION model")
    p.add_argument(
        "--images", default=None, help="a folder of images or a JSONL of generation records (default: "
        "ShapesWorld held-out generation records at the model's image size)",
    )  # fmt: skip
    p.add_argument(
        "--data", default=None, help="ShapesWorld eval set folder (default: data/shapes-eval-SIZE)"
    )
    p.add_argument("--n", type=int, default=32, help="images to probe (default: 32)")
    p.add_argument("--size", type=int, default=None, help="ShapesWorld image side (default: the model's)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", default="runs/drift", help="folder for drift.md, drift.png, drift.json")
    p.set_defaults(func=_cmd_eval_drift)
