"""The ``orion`` command: one subcommand per job.

    orion demo  [--preset micro] [--out runs/demo] [--steps 200]   build, train 3 losses, save, reload
    orion build --preset tiny --out DIR [--head mlp]              write a random-init ORION model dir
    orion build --from-qwen QWEN_DIR --out DIR [--head mlp]       wrap a local Qwen2.5-VL with a new head
    orion info  DIR                                               describe a model directory
    orion presets                                                 list architecture presets
    orion data check FILE.jsonl [--image-root DIR] [--decode]     validate a conversation dataset
    orion data shapes --out DIR [--size 64] [--n-und N ...]       write the ShapesWorld datasets
    orion eval shapes-gen --oracle --out DIR [--size 64]          oracle renders in GenEval layout, scored
    orion eval shapes-score --images DIR                          score any GenEval-layout folder
    orion eval shapes-gen --model DIR --out DIR                   a model's images for the prompt set, scored
    orion eval shapes-und --model DIR [--n 200]                   understanding accuracy (held-out set)
    orion eval shapes-edit --model DIR [--n 200]                  editing accuracy (held-out set)
    orion eval drift --base DIR --model DIR [--images PATH]       semantic drift table + figure
    orion quickstart [--preset tiny|micro] [--out DIR]            the whole pipeline, report + metrics.json
    orion ablate [--preset tiny] [--seeds 3] [--configs A G ...]  Table 4 ablations, mean ± std over seeds
    orion train RECIPE.yaml [--output DIR] [--nproc N] [key=value ...]   one training stage (resumes)
    orion decode --decoder DIR --tokens T.safetensors -o out.png [--steps N --cfg S --seed S]
    orion convert nexus-gen-decoder SRC DST (--flux FLUX_DIR | --pooled FILE)
    orion generate --model DIR [--decoder DIR] "prompt" -o out.png [--n K] [--seed S] [--elaborate]
    orion ask --model DIR --image PATH [--image PATH ...] "question" [--max-new-tokens N]
    orion edit --model DIR [--decoder DIR] --image PATH "instruction" -o out.png
    orion chat --model DIR [--decoder DIR] [--out-dir DIR]          REPL; also reads piped input
    orion serve --model DIR [--decoder DIR] [--host 127.0.0.1] [--port 8000]   web chat + OpenAI API

Errors in user input print one line naming the problem and exit non-zero (``--debug`` for the
traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from orion_mllm import __version__
from orion_mllm.config import PRESETS


def _cmd_presets(args: argparse.Namespace) -> int:
    for name, p in PRESETS.items():
        t = p.text
        print(
            f"{name:15s} hidden={t.hidden_size:<5d} layers={t.num_hidden_layers:<3d} "
            f"gen={p.gen_image_size}px/{p.gen_num_tokens} tokens  "
            f"und=[{p.und_min_long_side},{p.und_max_long_side}]  "
            f"{p.description}"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from orion_mllm.demo import run_demo

    summary = run_demo(preset=args.preset, out=args.out, steps=args.steps, seed=args.seed)
    before, after = summary["loss_before"], summary["loss_after"]
    print(
        f"\n{summary['preset']}: {summary['parameters']:,} parameters, "
        f"{summary['conversations']} conversations, "
        f"{summary['steps']} steps in {summary['wall_seconds']} s"
    )
    for key in ("ce", "mse", "kl"):
        print(f"  {key:4s} {before[key]:.4g} -> {after[key]:.4g}")
    print(f"  saved to {summary['model_dir']} and reloaded identically: {summary['reload_identical']}")
    print(json.dumps(summary))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from orion_mllm.model.orion import OrionModel

    if bool(args.preset) == bool(args.from_qwen):
        raise ValueError("give exactly one of --preset NAME or --from-qwen DIR")
    if args.preset:
        model = OrionModel.from_preset(args.preset, head=args.head, mlp_ratio=args.mlp_ratio, seed=args.seed)
    else:
        model = OrionModel.from_qwen(args.from_qwen, head=args.head, mlp_ratio=args.mlp_ratio, seed=args.seed)
    path = model.save_pretrained(args.out)
    print(f"wrote {path} ({sum(p.numel() for p in model.parameters()):,} parameters, head={args.head})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from orion_mllm.model.orion import OrionModel

    model = OrionModel.from_pretrained(args.model_dir)
    text = model.backbone.config.text_config
    info = {
        "model_dir": args.model_dir,
        "orion_config": model.config.to_dict(),
        "llm": {
            "hidden_size": text.hidden_size,
            "layers": text.num_hidden_layers,
            "vocab_size": text.vocab_size,
        },
        "parameters": {
            "total": sum(p.numel() for p in model.parameters()),
            "vision_head": sum(p.numel() for p in model.vision_head.parameters()),
            "vision_tower": sum(p.numel() for p in model.backbone.model.visual.parameters()),
        },
    }
    print(json.dumps(info, indent=2))
    return 0


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
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    print(json.dumps(meta["counts"]))
    return 0


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
    from orion_mllm.eval.model_eval import eval_generation

    pipe = _eval_pipeline(args, need_decoder=True)
    _print_scores(eval_generation(pipe, args.out, prompts=prompt_set(args.seed), batch_size=args.batch_size))
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


def _cmd_ablate(args: argparse.Namespace) -> int:
    from orion_mllm.workflow.ablate import Ablation

    ab = Ablation(
        args.preset, args.out, seeds=args.seeds, configs=args.configs, max_steps=args.max_steps,
        eval_limit=args.eval_limit, base=args.base,
    )  # fmt: skip
    ab.run()
    print((ab.out / "ablation.md").read_text())
    print(json.dumps({"table": str(ab.out / "ablation.md"), "json": str(ab.out / "ablation.json")}))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from orion_mllm.workflow.quickstart import Quickstart

    qs = Quickstart(args.preset, args.out, max_steps=args.max_steps, eval_limit=args.eval_limit)
    m = qs.run()
    print(
        f"\nquickstart {m['preset']} finished: {m['wall_minutes']:.1f} min of steps\n"
        f"  understanding  base {m['base_und_accuracy']:.3f} -> final {m['final_und_accuracy']:.3f}\n"
        f"  generation     shapes-gen overall {m['gen_overall']:.3f}\n"
        f"  editing        shapes-edit {m['edit_accuracy']:.3f}\n"
        f"  drift          KL(base || final) {m['drift_kl_final']:.4f}\n"
        f"  report         {qs.out / 'report.md'}\n"
        f"  model          {m['model_dir']}  (try: orion chat --model {m['model_dir']})"
    )
    print(json.dumps({k: m[k] for k in ("model_dir", "wall_minutes", "preset")}))
    return 0


def _cmd_eval_shapes_score(args: argparse.Namespace) -> int:
    from orion_mllm.eval.shapes_gen import score_folder

    _print_scores(score_folder(args.images))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from orion_mllm.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # fail fast, before any process is spawned
    output = args.output or str(_default_output(args.recipe))
    if recipe.stage == "decoder":
        from orion_mllm.train.decoder_trainer import DecoderTrainer

        final = DecoderTrainer(recipe, output).run()
        print(json.dumps({"run_dir": str(Path(output).resolve()), "final_model": str(final)}))
        return 0
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from orion_mllm.train.trainer import preflight

        preflight(recipe, output)  # bad paths / data are reported once, here, not by every rank
        # The same command under torchrun: FSDP2 over N local processes (gloo on CPU, NCCL on GPU).
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "orion_mllm.cli",
            "train",
            args.recipe,
            "--output",
            output,
            *args.overrides,
        ]
        if args.debug:
            cmd.insert(cmd.index("train"), "--debug")
        rc = subprocess.call(cmd)
        if rc != 0:
            print(
                f"orion train: error: a training process failed (exit {rc}); see rank 0's message above",
                file=sys.stderr,
            )
            return 2
        return 0
    from orion_mllm.train.trainer import Trainer

    result = Trainer(recipe, output, recipe_path=str(args.recipe)).run()
    if result.run_dir and int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "run_dir": str(result.run_dir),
                    "final_model": str(result.final_model),
                    "steps": result.steps,
                    "skipped_steps": result.skipped_steps,
                    "skipped_samples": result.skipped_samples,
                    "last": {k: result.last_metrics.get(k) for k in ("loss", "ce", "mse", "kl")},
                }
            )
        )
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from orion_mllm.decoder.flow import sample, to_pil_images
    from orion_mllm.decoder.model import OrionDecoder

    decoder = OrionDecoder.from_pretrained(args.decoder)
    decoder.eval()
    path = Path(args.tokens)
    if not path.is_file():
        raise FileNotFoundError(f"tokens file not found: {path}")
    data = load_file(path)
    if "tokens" not in data:
        raise ValueError(
            f"{path}: expected a tensor named 'tokens' ([N, d] or [B, N, d]), found {sorted(data)}"
        )
    tokens = data["tokens"].float()
    tokens = tokens.unsqueeze(0) if tokens.dim() == 2 else tokens
    edit = data.get("edit_tokens")
    if edit is not None:
        edit = edit.float().unsqueeze(0) if edit.dim() == 2 else edit.float()
    images = sample(decoder, tokens, edit_tokens=edit, steps=args.steps, cfg_scale=args.cfg, seed=args.seed)
    written = _write_images(to_pil_images(images), args.output)
    print(json.dumps({"images": written}))
    return 0


def _cmd_convert_nexus_gen(args: argparse.Namespace) -> int:
    from orion_mllm.decoder.convert import convert_nexus_gen_decoder

    if not (args.flux or args.pooled):
        raise ValueError(
            "Nexus-Gen decoders condition on CLIP's pooled embedding of an empty prompt: give --flux "
            "FLUX_DIR (a local FLUX.1-dev in diffusers layout, also the VAE source) or --pooled FILE"
        )
    out = convert_nexus_gen_decoder(
        args.src, args.dst, flux_path=args.flux, pooled_embedding=args.pooled,
        num_tokens=args.num_tokens, image_size=args.image_size,
    )  # fmt: skip
    print(json.dumps({"decoder": str(out)}))
    return 0


def _pipeline(args: argparse.Namespace, *, need_decoder: bool = False):
    from transformers.utils import logging as hf_logging

    from orion_mllm.inference.pipeline import NO_DECODER, OrionPipeline

    # Inference commands print their answer only: no weight-loading bars on the terminal.
    hf_logging.disable_progress_bar()

    pipe = OrionPipeline.load(
        args.model, getattr(args, "decoder", None), device=args.device, dtype=args.dtype,
        offload_decoder=not args.no_offload,
    )  # fmt: skip
    if need_decoder and pipe.decoder is None:
        raise ValueError(NO_DECODER)
    return pipe


def _sampling(args: argparse.Namespace, **kw):
    from orion_mllm.inference.engine import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, **kw
    )


def _write_images(images, output: str) -> list[str]:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(images):
        target = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        img.save(target)
        written.append(str(target))
    return written


def _check_output(path: str) -> None:
    from PIL import Image

    if Path(path).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"-o {path}: unknown image file extension (use .png or .jpg)")


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise ValueError("empty prompt")
    if args.n < 1:
        raise ValueError(f"--n {args.n}: must be >= 1")
    _check_output(args.output)
    pipe = _pipeline(args, need_decoder=True)
    tokens, prompts = pipe.image_tokens(
        args.prompt, n=args.n, seed=args.seed, elaborate=args.elaborate, temperature=args.temperature or 1.0
    )
    written = _write_images(
        pipe.render(tokens, seed=args.seed, steps=args.steps, cfg_scale=args.cfg), args.output
    )
    print(json.dumps({"images": written, "prompts": prompts}))
    return 0


def _load_user_images(paths: list[str]):
    from orion_mllm.images import load_image

    return [load_image(p, where="--image") for p in paths]


def _cmd_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError("empty question")
    images = _load_user_images(args.image or [])
    pipe = _pipeline(args)
    print(pipe.ask(images, args.question, _sampling(args, allow_images=False)))
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    if not args.instruction.strip():
        raise ValueError("empty instruction")
    _check_output(args.output)
    (source,) = _load_user_images([args.image])
    pipe = _pipeline(args, need_decoder=True)
    tokens, _ = pipe.image_tokens(args.instruction, seed=args.seed, source=source)
    written = _write_images(
        pipe.render(tokens, seed=args.seed, steps=args.steps, cfg_scale=args.cfg), args.output
    )
    print(json.dumps({"images": written}))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from orion_mllm.inference.chat import ChatRepl

    pipe = _pipeline(args)
    return ChatRepl(pipe, args.out_dir, _sampling(args), seed=args.seed).run()


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from orion_mllm.serve.app import create_app
    from orion_mllm.serve.openai_api import ServeConfig

    pipe = _pipeline(args)
    name = args.served_name or Path(args.model).resolve().name
    config = ServeConfig(
        model_name=name, max_queue=args.max_queue, max_batch=args.max_batch,
        request_timeout_s=args.timeout, max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    web_dir = None if args.no_web else args.web_dir
    app = create_app(pipe, config, web_dir=web_dir)
    if web_dir is not None:
        print(f"web chat on http://{args.host}:{args.port}/ (images written to {web_dir})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _default_output(recipe: str):
    from orion_mllm.train.trainer import default_output_dir

    return default_output_dir(recipe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orion", description="ORION unified multimodal models on Qwen2.5-VL."
    )
    parser.add_argument("--version", action="version", version=f"orion-mllm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build a small model, train the three ORION losses, save and reload it")
    p.add_argument(
        "--preset", default="micro", choices=["micro", "tiny"], help="architecture preset (default: micro)"
    )
    p.add_argument("--out", default="runs/demo", help="where to save the trained model (default: runs/demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "build", help="write an ORION model directory (random preset or local Qwen2.5-VL + new head)"
    )
    p.add_argument("--preset", choices=list(PRESETS), help="random-init architecture preset")
    p.add_argument("--from-qwen", metavar="DIR", help="local Qwen2.5-VL Hugging Face directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--head", default="mlp", choices=["linear", "mlp", "qformer", "layer_mix"])
    p.add_argument("--mlp-ratio", type=int, default=8, help="MLP head hidden multiplier (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("info", help="describe an ORION model directory")
    p.add_argument("model_dir")
    p.set_defaults(func=_cmd_info)

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
    p.add_argument("--n-heldout", type=int, default=100, help="held-out composition prompts (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gen-layout", default="canonical", choices=["canonical", "random"],
        help="text-to-image targets: the caption's canonical picture (default) or free layouts",
    )  # fmt: skip
    p.set_defaults(func=_cmd_data_shapes)

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
    p.set_defaults(func=_cmd_eval_shapes_gen)
    p = eval_sub.add_parser("shapes-score", help="score a GenEval-layout folder of images")
    p.add_argument(
        "--images", required=True, help="folder with <index>/metadata.jsonl and <index>/samples/*.png"
    )
    p.set_defaults(func=_cmd_eval_shapes_score)

    def eval_model_options(p: argparse.ArgumentParser, n: int) -> None:
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

    p = eval_sub.add_parser(
        "shapes-und", help="understanding accuracy of a model (circular MCQ, short answers)"
    )
    eval_model_options(p, 200)
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

    def workflow_options(p: argparse.ArgumentParser, name: str) -> None:
        p.add_argument("--out", default=None, help=f"run folder (default: runs/{name}-PRESET)")
        p.add_argument("--max-steps", type=int, default=None, help="cap every training stage (smoke runs)")
        p.add_argument("--eval-limit", type=int, default=None, help="cap every evaluation set (smoke runs)")

    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on ShapesWorld: base VLM, decoder, ORION stages 1-3, eval, report",
        description="Generate ShapesWorld data, train the base VLM (stage 0) and the decoder, run ORION "
        "stages 1-3, evaluate base and final models, write OUT/report.md and OUT/metrics.json. "
        "Re-running resumes.",
    )
    p.add_argument(
        "--preset", default="tiny", choices=["micro", "tiny"], help="tiny (default, ~20 min) or micro"
    )
    workflow_options(p, "quickstart")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser(
        "ablate",
        help="Table 4 at ShapesWorld scale: vision heads, warm-up data, KL on/off, layer_mix; mean ± std",
        description="Run ORION stages 1-3 per configuration and seed from one shared stage-0 base and "
        "decoder (OUT/base), evaluate each, and write OUT/ablation.md and OUT/ablation.json. Configurations: "
        "A/B linear, C/D qformer (small/large warm-up, no KL), E0/E/F mlp (none/small/large, no KL), "
        "G mlp + KL (ORION), LM layer_mix + KL. Re-running resumes.",
    )
    p.add_argument("--preset", default="tiny", choices=["micro", "tiny"])
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default: 3)")
    p.add_argument("--configs", nargs="+", default=None, help="subset of A B C D E0 E F G LM (default: all)")
    p.add_argument(
        "--base", default=None, help="a finished `orion quickstart` folder whose stage-0 base and decoder "
        "all configurations share (default: train them in OUT/base)",
    )  # fmt: skip
    workflow_options(p, "ablate")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser(
        "train",
        help="run one training stage from a recipe (re-running the command resumes)",
        description="Train one stage. Overrides are dotted keys, e.g. train.max_steps=20 checkpoint.every=10 "
        "data_root=DIR model.init=DIR teacher=DIR; max_steps=N is short for train.max_steps=N.",
    )
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/shapes/micro/stage1_warmup.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    p.add_argument("--output", help="run directory (default: runs/<recipe folder>/<recipe name>)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (FSDP2 via torchrun)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("decode", help="render visual tokens (a .safetensors file) to an image with a decoder")
    p.add_argument("--decoder", required=True, help="decoder directory (decoder_config.json + weights)")
    p.add_argument("--tokens", required=True, help="safetensors file with 'tokens' [N, d] or [B, N, d]")
    p.add_argument("-o", "--output", required=True, help="output PNG (several images: NAME_i.png)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_decode)

    conv = sub.add_parser("convert", help="convert checkpoints from other projects")
    conv_sub = conv.add_subparsers(dest="what", required=True)
    p = conv_sub.add_parser(
        "nexus-gen-decoder", help="a Nexus-Gen generation decoder (DiffSynth FLUX + adapter) -> orion decoder"
    )
    p.add_argument("src", help="Nexus-Gen decoder checkpoint (.safetensors/.bin/.pth file or shard folder)")
    p.add_argument("dst", help="output decoder directory")
    p.add_argument(
        "--flux", help="local FLUX.1-dev folder (diffusers layout): VAE + CLIP for the pooled input"
    )
    p.add_argument(
        "--pooled", help="safetensors file holding CLIP-L's pooled embedding of '' (instead of --flux)"
    )
    p.add_argument("--num-tokens", type=int, default=81, help="visual tokens per image (81 at 252 px)")
    p.add_argument("--image-size", type=int, default=512, help="output image side in pixels")
    p.set_defaults(func=_cmd_convert_nexus_gen)

    def model_options(p: argparse.ArgumentParser, *, decoder: bool) -> None:
        p.add_argument(
            "--model", required=True, help="ORION model directory (or a plain Qwen2.5-VL one, for ask)"
        )
        if decoder:
            p.add_argument("--decoder", default=None, help="decoder directory (default: MODEL/decoder)")
        p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
        p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU")
        p.add_argument("--no-offload", action="store_true", help="keep the decoder on the GPU with the LLM")
        p.add_argument("--seed", type=int, default=0)

    def text_options(p: argparse.ArgumentParser, max_new: int, temperature: float) -> None:
        p.add_argument("--max-new-tokens", type=int, default=max_new)
        p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
        p.add_argument("--top-p", type=float, default=1.0)

    def render_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-o", "--output", required=True, help="image file; with --n K: out_0.png ...")
        p.add_argument(
            "--steps", type=int, default=None, help="decoder sampling steps (default: the decoder's)"
        )
        p.add_argument(
            "--cfg", type=float, default=None, help="decoder guidance scale (default: the decoder's)"
        )

    p = sub.add_parser("generate", help="text -> image: regress visual tokens, render them with the decoder")
    p.add_argument("prompt")
    model_options(p, decoder=True)
    render_options(p)
    p.add_argument("--n", type=int, default=1, help="images; without --elaborate they share one token set")
    p.add_argument(
        "--elaborate", action="store_true", help="first sample a detailed prompt per image (diversity)"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="for --elaborate")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("ask", help="images + question -> answer (only the answer is printed)")
    p.add_argument("question")
    p.add_argument("--image", action="append", help="an image file (repeat for several)")
    model_options(p, decoder=False)
    text_options(p, 256, 0.0)
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("edit", help="image + instruction -> edited image")
    p.add_argument("instruction")
    p.add_argument("--image", required=True, help="the image to edit")
    model_options(p, decoder=True)
    render_options(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("chat", help="interleaved multi-turn chat (REPL; reads piped input too)")
    model_options(p, decoder=True)
    text_options(p, 256, 0.0)
    p.add_argument("--out-dir", default="chat_images", help="where generated images are written")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat, images, edits) for a model")
    model_options(p, decoder=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name", default=None, help="model name in the API (default: the folder name)")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests before 429")
    p.add_argument("--max-batch", type=int, default=8, help="requests per engine batch")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (504 after)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--web-dir", default="serve_images", help="where the web chat writes generated images")
    p.add_argument("--no-web", action="store_true", help="serve the API only (no web chat at /)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("presets", help="list architecture presets")
    p.set_defaults(func=_cmd_presets)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or data, reported in one line rather than a traceback."""
    from orion_mllm.train.anomaly import TrainingDiverged
    from orion_mllm.train.loop import DataQualityError

    return (ValueError, FileNotFoundError, OSError, TrainingDiverged, DataQualityError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`orion train R.yaml --output D key=value`): argparse leaves those
    # unmatched, so take the key=value ones back here and reject anything else as usual.
    if extra and args.command == "train" and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except Exception as err:
        if args.debug or not isinstance(err, _user_errors()):
            raise
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports it once
            return 2
        print(f"orion {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
