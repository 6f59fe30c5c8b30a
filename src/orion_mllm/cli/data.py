"""``orion data check`` and ``orion data shapes``: validate conversation files, write ShapesWorld data."""

from __future__ import annotations

import argparse
import json


def _cmd_data_check(args: argparse.Namespace) -> int:
    from orion_mllm.data.check import check_jsonl

    report = check_jsonl(args.file, image_root=args.image_root, decode=args.decode)
    for problem in report.problems:
        print(problem)
    summary = report.to_dict()
    tasks = ", ".join(f"{k} {v}" for k, v in summary["tasks"].items())
    print(
        f"{report.path}: {summary['records']} records ({tasks}), {summary['images']} images, "
        f"{summary['problems']} problem(s)"
    )
    print(json.dumps(summary))
    return 0 if report.ok else 1


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from orion_mllm.data.shapes.datasets import write_shapes_dataset

    meta = write_shapes_dataset(
        args.out,
        size=args.size,
        n_und=args.n_und,
        n_gen=args.n_gen,
        n_edit=args.n_edit,
        n_interleaved=args.n_interleaved,
        n_heldout=args.n_heldout,
        seed=args.seed,
        gen_layout=args.gen_layout,
        holdout=args.holdout,
        caption_order=args.caption_order,
        add_layout=args.add_layout,
        question_first=args.question_first,
        mcq_answer=args.mcq_answer,
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    print(json.dumps(meta["counts"]))
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    """``orion data`` and its subcommands."""
    data = sub.add_parser("data", help="datasets: validate conversation files")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="validate a conversation JSONL (LLaVA or ms-swift form)")
    p.add_argument("file", help="the .jsonl file")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--decode", action="store_true", help="also open every image (slower)")
    p.set_defaults(func=_cmd_data_check)

    p = data_sub.add_parser("shapes", help="write the ShapesWorld datasets (JSONL + PNG) and meta.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, 32..512 (default: 64)")
    p.add_argument("--n-und", type=int, default=1000, help="understanding records (default: 1000)")
    p.add_argument("--n-gen", type=int, default=1000, help="text-to-image records (default: 1000)")
    p.add_argument("--n-edit", type=int, default=500, help="editing records (default: 500)")
    p.add_argument(
        "--n-interleaved", type=int, default=100, help="generate-then-ask eval dialogues (default: 100)"
    )
    p.add_argument("--n-heldout", type=int, default=100, help="held-out text-to-image prompts (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gen-layout", default="canonical", choices=["canonical", "random"],
        help="text-to-image targets: the caption's canonical picture (default) or free layouts",
    )  # fmt: skip
    p.add_argument(
        "--holdout", default="captions", choices=["captions", "pairs"],
        help="kept out of training: a fifth of the text-to-image captions (default), or three "
        "colour-shape pairs and four-of-a-shape in every file",
    )  # fmt: skip
    p.add_argument(
        "--caption-order", default="scene", choices=["scene", "shape", "colour", "split"],
        help="the order captions list objects in: the scene's own, i.e. random (default, as the recipes), "
        "sorted by shape, by colour, or by shape for 'Describe the shapes you see.' and by colour otherwise",
    )  # fmt: skip
    p.add_argument(
        "--add-layout", default="canonical", choices=["canonical", "random"],
        help="where 'add' edits put the new object: small, on the first free fixed slot (default: the "
        "target is a function of the source and the words) or anywhere at random (folders before it)",
    )  # fmt: skip
    p.add_argument(
        "--question-first", action="store_true",
        help="understanding records ask their first question before the picture ('Q\\n<image>'; default: "
        "LLaVA's '<image>\\nQ')",
    )  # fmt: skip
    p.add_argument(
        "--mcq-answer", default="letter", choices=["letter", "reasoned"],
        help="multiple-choice answers: the option's letter (default) or 'The star is red, so B.'",
    )  # fmt: skip
    p.set_defaults(func=_cmd_data_shapes)
