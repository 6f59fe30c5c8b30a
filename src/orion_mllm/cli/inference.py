"""``orion decode``, ``generate``, ``ask``, ``edit`` and ``chat``: a trained model (and decoder) at work."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_pipeline(args: argparse.Namespace, *, need_decoder: bool = False):
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


def _load_user_images(paths: list[str]):
    from orion_mllm.images import load_image

    return [load_image(p, where="--image") for p in paths]


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


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise ValueError("empty prompt")
    if args.n < 1:
        raise ValueError(f"--n {args.n}: must be >= 1")
    _check_output(args.output)
    pipe = load_pipeline(args, need_decoder=True)
    tokens, prompts = pipe.image_tokens(
        args.prompt, n=args.n, seed=args.seed, elaborate=args.elaborate,
        temperature=args.temperature or 1.0, system=args.system, guidance=_guidance(args),
    )  # fmt: skip
    written = _write_images(
        pipe.render(tokens, seed=args.seed, steps=args.steps, cfg_scale=args.cfg), args.output
    )
    print(json.dumps({"images": written, "prompts": prompts}))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError("empty question")
    images = _load_user_images(args.image or [])
    pipe = load_pipeline(args)
    print(pipe.ask(images, args.question, _sampling(args, allow_images=False), system=args.system))
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    if not args.instruction.strip():
        raise ValueError("empty instruction")
    _check_output(args.output)
    (source,) = _load_user_images([args.image])
    pipe = load_pipeline(args, need_decoder=True)
    tokens, _ = pipe.image_tokens(
        args.instruction, seed=args.seed, source=source, system=args.system, guidance=_guidance(args)
    )
    written = _write_images(
        pipe.render(tokens, seed=args.seed, steps=args.steps, cfg_scale=args.cfg), args.output
    )
    print(json.dumps({"images": written}))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from orion_mllm.inference.chat import ChatRepl

    pipe = load_pipeline(args)
    return ChatRepl(pipe, args.out_dir, _sampling(args), seed=args.seed, system=args.system).run()


def model_options(p: argparse.ArgumentParser, *, decoder: bool) -> None:
    """Which model (and decoder) to load, and where: every inference command and ``orion serve``."""
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
    """Text sampling: ``ask`` and ``chat``."""
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)


def _guidance(args: argparse.Namespace) -> float | None:
    """``--guidance``, checked; None: the model's own default (its orion_config.json)."""
    if args.guidance is not None and not args.guidance >= 0:
        raise ValueError(f"--guidance {args.guidance}: must be >= 0 (1: no guidance)")
    return args.guidance


def system_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt, rendered by the model's chat template")


def render_options(p: argparse.ArgumentParser) -> None:
    """The output image, token-space guidance and the decoder's sampling: ``generate`` and ``edit``."""
    p.add_argument("-o", "--output", required=True, help="image file; with --n K: out_0.png ...")
    p.add_argument(
        "--guidance", type=float, default=None,
        help="token-space classifier-free guidance w: v_u + w (v_c - v_u) against the request-less "
        "prediction (1: none; default: the model's own, set by its training recipe)",
    )  # fmt: skip
    system_option(p)
    p.add_argument("--steps", type=int, default=None, help="decoder sampling steps (default: the decoder's)")
    p.add_argument("--cfg", type=float, default=None, help="decoder guidance scale (default: the decoder's)")


def add_decode(sub: argparse._SubParsersAction) -> None:
    """``orion decode``."""
    p = sub.add_parser("decode", help="render visual tokens (a .safetensors file) to an image with a decoder")
    p.add_argument("--decoder", required=True, help="decoder directory (decoder_config.json + weights)")
    p.add_argument("--tokens", required=True, help="safetensors file with 'tokens' [N, d] or [B, N, d]")
    p.add_argument("-o", "--output", required=True, help="output PNG (several images: NAME_i.png)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_decode)


def add_generate(sub: argparse._SubParsersAction) -> None:
    """``orion generate``."""
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


def add_ask(sub: argparse._SubParsersAction) -> None:
    """``orion ask``."""
    p = sub.add_parser("ask", help="images + question -> answer (only the answer is printed)")
    p.add_argument("question")
    p.add_argument("--image", action="append", help="an image file (repeat for several)")
    model_options(p, decoder=False)
    text_options(p, 256, 0.0)
    system_option(p)
    p.set_defaults(func=_cmd_ask)


def add_edit(sub: argparse._SubParsersAction) -> None:
    """``orion edit``."""
    p = sub.add_parser("edit", help="image + instruction -> edited image")
    p.add_argument("instruction")
    p.add_argument("--image", required=True, help="the image to edit")
    model_options(p, decoder=True)
    render_options(p)
    p.set_defaults(func=_cmd_edit)


def add_chat(sub: argparse._SubParsersAction) -> None:
    """``orion chat``."""
    p = sub.add_parser("chat", help="interleaved multi-turn chat (REPL; reads piped input too)")
    model_options(p, decoder=True)
    text_options(p, 256, 0.0)
    p.add_argument("--out-dir", default="chat_images", help="where generated images are written")
    system_option(p)
    p.set_defaults(func=_cmd_chat)
