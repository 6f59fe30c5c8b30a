"""``orion eval ...``: the ShapesWorld benchmarks (shapes-gen, -score, -und, -edit), drift, and the
field's benchmarks: GenEval's layout (``geneval``) and lmms-eval (``lmms``)."""

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
    from orion_mllm.eval.shapes_gen import prompt_set, score_folder, write_metadata, write_oracle

    if args.write_metadata:
        n = write_metadata(args.write_metadata, seed=args.seed)
        print(f"wrote the {n} shapes-gen prompts as a GenEval metadata file: {args.write_metadata}")
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required (where the images are written)")
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


def _cmd_eval_geneval(args: argparse.Namespace) -> int:
    from orion_mllm.eval.geneval import default_metadata, export_geneval, pending, read_metadata

    metadata = Path(args.metadata) if args.metadata else default_metadata()
    prompts = read_metadata(metadata)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit {args.limit}: must be at least 1")
        prompts = prompts[: args.limit]
    if args.guidance is not None and not args.guidance >= 0:
        raise ValueError(f"--guidance {args.guidance}: must be >= 0 (1: no guidance)")
    if args.n_samples < 1:
        raise ValueError(f"--n-samples {args.n_samples}: need at least one image per prompt")
    pending(prompts, args.out, args.n_samples, str(metadata))  # a foreign folder is refused before loading
    pipe = _eval_pipeline(args, need_decoder=True)
    summary = export_geneval(
        pipe, prompts, args.out, n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed,
        guidance=args.guidance, source=str(metadata),
    )  # fmt: skip
    print(
        f"{args.out}: {summary['written']} prompts written, {summary['skipped']} already there "
        f"({summary['samples_per_prompt']} samples each). Score with GenEval's "
        f"evaluation/evaluate_images.py {args.out} (detector), or, for ShapesWorld prompts, "
        f"orion eval shapes-score --images {args.out}"
    )
    print(json.dumps(summary))
    return 0


def _gen_size(model: str, size: int | None) -> int:
    """The ShapesWorld image side for a model: ``--size``, else its ``orion_config.json``'s."""
    if size:
        return size
    config = Path(model) / "orion_config.json"
    if not config.is_file():
        raise ValueError(f"{model}: not an ORION model directory (no orion_config.json): give --size")
    return int(json.loads(config.read_text())["image_spec"]["gen_image_size"])


def _cmd_eval_lmms(args: argparse.Namespace) -> int:
    import os
    import sys
    from contextlib import redirect_stdout

    try:
        import lmms_eval.__main__ as harness
    except ImportError as err:  # the harness or one of its own dependencies
        raise ValueError(
            f"orion eval lmms needs lmms-eval, an optional extra: pip install 'orion-mllm[eval]' ({err})"
        ) from err
    from orion_mllm.eval.lmms_model import MODEL_NAME, register
    from orion_mllm.eval.lmms_tasks import TASKS_DIR

    model = Path(args.model).resolve()
    if not model.is_dir():
        raise FileNotFoundError(f"model directory not found: {model}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r}: name at least one task")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
    if "shapes_und" in tasks:  # the shipped ShapesWorld task reads its folder from the environment
        from orion_mllm.eval.model_eval import eval_set

        size = _gen_size(str(model), args.size)
        root = Path(args.data or f"data/shapes-eval-{size}").resolve()
        eval_set(root, size=size, n_und=max(args.n, 200), n_edit=200)
        os.environ["ORION_SHAPES_DATA"], os.environ["ORION_SHAPES_N"] = str(root), str(args.n)
        question_first = args.question_first
        if question_first is None:
            question_first = _recorded_question_first(model)
        os.environ["ORION_SHAPES_QUESTION_FIRST"] = "1" if question_first else "0"
    model_args = f"pretrained={model}"
    if args.decoder:
        model_args += f",decoder={Path(args.decoder).resolve()}"
    if args.model_args:
        model_args += f",{args.model_args}"
    harness_args = list(args.harness_args or [])
    if harness_args[:1] == ["--"]:
        harness_args = harness_args[1:]
    argv = ["lmms-eval", "--model", MODEL_NAME, "--model_args", model_args, "--tasks", ",".join(tasks),
            "--batch_size", str(args.batch_size), "--output_path", str(args.output),
            "--device", args.device]  # fmt: skip
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if "--verbosity" not in harness_args:
        argv += ["--verbosity", "WARNING"]
    register()
    saved_argv, sys.argv = sys.argv, argv + harness_args
    try:
        _, parsed = harness.parse_eval_args()
    finally:
        sys.argv = saved_argv
    # The shipped tasks are always found; --include-path adds the user's own task folders.
    parsed.include_path = [str(TASKS_DIR), *(str(Path(p).resolve()) for p in args.include_path or [])]
    # The harness's logger writes to stdout; keep it on stderr so stdout ends with the table and JSON.
    harness.eval_logger.remove()
    harness.eval_logger.add(sys.stderr, level=parsed.verbosity)
    with redirect_stdout(sys.stderr):
        results, _ = harness.cli_evaluate_single(parsed)
    if results is None:
        raise RuntimeError("lmms-eval returned no results (see its log above)")
    # What the harness's own CLI prints after a run (its `print_results` helper is out of date).
    print(f"{parsed.model} ({parsed.model_args}), limit: {parsed.limit}, batch_size: {parsed.batch_size}")
    print(harness.make_table(results))
    if "groups" in results:
        print(harness.make_table(results, "groups"))
    # One JSON line last: each task's metrics (filter "none"), NaN (a type with no questions) as null.
    summary = {
        task: {k.split(",")[0]: (None if isinstance(v, float) and v != v else v)
               for k, v in metrics.items() if "_stderr" not in k and k != "alias"}
        for task, metrics in results["results"].items()
    }  # fmt: skip
    print(json.dumps({"results": summary, "output": str(args.output)}))
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
    question_first = _question_first(args, pipe)
    scores = eval_understanding(
        pipe, records, root, batch_size=args.batch_size, question_first=question_first
    )
    print(f"  asked          {'question, then picture' if question_first else 'picture, then question'}")
    for k, v in scores.items():
        print(f"  {k:14s} {v:.4f}" if k != "questions" else f"  {k:14s} {v}")
    # The same keys as the quickstart's und.json.
    print(json.dumps({**scores, "question_first": question_first}))
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


def question_first_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--question-first", action=argparse.BooleanOptionalAction, default=None,
        help="put the picture after the first question (--no-question-first: before it, LLaVA's order); "
        "default: as the model was trained (an ORION model records it; a plain Qwen2.5-VL base: before; "
        "a base trained on shapes_data.question_first data, such as the tiny recipes', needs the flag)",
    )  # fmt: skip


def _recorded_question_first(model: Path) -> bool:
    """What an ORION model directory records (``OrionConfig.question_first``); a plain base: False."""
    from orion_mllm.model.orion import ORION_CONFIG_NAME

    config = model / ORION_CONFIG_NAME
    return config.is_file() and bool(json.loads(config.read_text()).get("question_first", False))


def _question_first(args: argparse.Namespace, pipe) -> bool:
    return pipe.question_first if args.question_first is None else args.question_first


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
        "--out", default=None, help="output folder (<out>/<index>/metadata.jsonl, samples/<k>.png)"
    )
    p.add_argument(
        "--write-metadata", default=None, metavar="FILE",
        help="only write the prompt set as a GenEval metadata file (for orion eval geneval) and exit",
    )  # fmt: skip
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--samples", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="prompt-set seed (default: 0, the fixed set)")
    p.add_argument("--guidance", type=float, default=None, help="token-space guidance (default: the model's)")
    p.add_argument(
        "--train-gen", default=None,
        help="the model's training gen.jsonl: also score the prompts whose caption it never saw",
    )  # fmt: skip
    p.set_defaults(func=_cmd_eval_shapes_gen)
    p = eval_sub.add_parser(
        "geneval", help="generate images for GenEval's prompt file in the layout its scorer reads",
        description="Writes <out>/<5-digit index>/metadata.jsonl (the prompt's line) and samples/<k>.png "
        "for every line of GenEval's metadata file (shipped; MIT). Resumable: finished prompts are "
        "skipped. Score with GenEval's evaluation/evaluate_images.py, or orion eval shapes-score for "
        "ShapesWorld prompts.",
    )  # fmt: skip
    p.add_argument("--model", required=True, help="ORION model directory (decoder inside)")
    p.add_argument("--decoder", default=None, help="decoder directory (default: MODEL/decoder)")
    p.add_argument(
        "--metadata", default=None,
        help="GenEval metadata JSONL (default: GenEval's evaluation_metadata.jsonl, shipped)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (GenEval's layout)")
    p.add_argument("--n-samples", type=int, default=4, help="images per prompt (default: 4, GenEval's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per engine batch (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: image k of prompt i uses SEED + i*N + k")
    p.add_argument("--guidance", type=float, default=None, help="token-space guidance (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_eval_geneval)
    p = eval_sub.add_parser(
        "lmms", help="run lmms-eval's benchmarks (MMBench, MMMU, MME, POPE, ...) on a model",
        description="Runs the lmms-eval harness (optional extra: pip install 'orion-mllm[eval]') with the "
        "model as its `orion` model class, and prints the harness's own results table (then one JSON "
        "line). The shipped ShapesWorld task `shapes_und` is always available; its data is a local "
        "folder (--data). Options after `--` go to lmms-eval unchanged, e.g. -- --log_samples.",
    )  # fmt: skip
    p.add_argument("--model", required=True, help="ORION model directory (or a plain Qwen2.5-VL base)")
    p.add_argument("--decoder", default=None, help="decoder directory (default: MODEL/decoder; not needed)")
    p.add_argument("--tasks", required=True, help="lmms-eval task names, comma-separated (e.g. shapes_und)")
    p.add_argument("--output", required=True, help="the harness's output folder (results JSON, samples)")
    p.add_argument(
        "--include-path", action="append", default=None, metavar="DIR",
        help="a folder of your own lmms-eval task YAMLs (repeatable); the shipped tasks are always included",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="documents per task (for a quick check only)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per engine batch (default: 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-args", default=None, help="more orion model_args, k=v,k2=v2 (lmms_model.py)")
    p.add_argument(
        "--data", default=None, help="shapes_und: the ShapesWorld eval folder (default: "
        "data/shapes-eval-SIZE, written on first use, as orion eval shapes-und)",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=1000, help="shapes_und: records to evaluate (default: 1000)")
    p.add_argument("--size", type=int, default=None, help="shapes_und: image side (default: the model's)")
    question_first_option(p)
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="-- then options passed to lmms-eval")
    p.set_defaults(func=_cmd_eval_lmms)
    p = eval_sub.add_parser("shapes-score", help="score a GenEval-layout folder of images")
    p.add_argument(
        "--images", required=True, help="folder with <index>/metadata.jsonl and <index>/samples/*.png"
    )
    p.set_defaults(func=_cmd_eval_shapes_score)
    p = eval_sub.add_parser(
        "shapes-und", help="understanding accuracy of a model (circular MCQ, short answers)"
    )
    eval_model_options(p, 1000)  # the quickstart's size (workflow.evaluate.EvalSizes.und)
    question_first_option(p)
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
