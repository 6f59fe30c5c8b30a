"""``orion build``, ``orion info``, ``orion presets`` and ``orion convert``: model directories."""

from __future__ import annotations

import argparse
import json

from orion_mllm.config import PRESETS


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


def add_build(sub: argparse._SubParsersAction) -> None:
    """``orion build``."""
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


def add_info(sub: argparse._SubParsersAction) -> None:
    """``orion info``."""
    p = sub.add_parser("info", help="describe an ORION model directory")
    p.add_argument("model_dir")
    p.set_defaults(func=_cmd_info)


def add_convert(sub: argparse._SubParsersAction) -> None:
    """``orion convert nexus-gen-decoder``."""
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


def add_presets(sub: argparse._SubParsersAction) -> None:
    """``orion presets``."""
    p = sub.add_parser("presets", help="list architecture presets")
    p.set_defaults(func=_cmd_presets)
