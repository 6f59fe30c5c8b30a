"""``orion serve``: the OpenAI-compatible HTTP API and the web chat for a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from orion_mllm.cli.inference import load_pipeline, model_options


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from orion_mllm.serve.app import create_app
    from orion_mllm.serve.openai_api import ServeConfig

    pipe = load_pipeline(args)
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


def add_serve(sub: argparse._SubParsersAction) -> None:
    """``orion serve``."""
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
