"""``orion serve``: the OpenAI-compatible HTTP API and the web chat for a model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from orion_mllm.cli.inference import load_pipeline, model_options

API_KEY_ENV = "ORION_API_KEY"


def resolve_api_key(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key: ``--api-key`` if given, else ``$ORION_API_KEY``; an empty string means no key."""
    environ = os.environ if environ is None else environ
    key = flag if flag is not None else environ.get(API_KEY_ENV, "")
    return key or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: 127.0.0.0/8, ::1 or ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # another host name (or 0.0.0.0 / ::, which are not loopback anyway)
        return False


def announce_access(
    host: str, port: int, api_key: str | None, *, out: TextIO | None = None, err: TextIO | None = None
) -> None:
    """Say whether requests need a key (never the key itself); warn when the port is open to others."""
    out, err = out or sys.stdout, err or sys.stderr
    if api_key:
        print("API key required: 'Authorization: Bearer KEY' on all routes but /health", file=out, flush=True)
        return
    print("no API key: every request is accepted", file=out, flush=True)
    if not is_loopback(host):
        print(
            f"warning: serving on {host} without an API key, so anyone who can reach port {port} can use "
            f"the model; set one with {API_KEY_ENV}=KEY (or --api-key KEY)",
            file=err,
            flush=True,
        )


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from orion_mllm.serve.app import create_app
    from orion_mllm.serve.openai_api import ServeConfig

    api_key = resolve_api_key(args.api_key)
    pipe = load_pipeline(args)
    name = args.served_name or Path(args.model).resolve().name
    config = ServeConfig(
        model_name=name, max_queue=args.max_queue, max_batch=args.max_batch,
        request_timeout_s=args.timeout, max_prompt_tokens=args.max_prompt_tokens, api_key=api_key,
    )  # fmt: skip
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    announce_access(args.host, args.port, api_key)
    web_dir = None if args.no_web else args.web_dir
    app = create_app(pipe, config, web_dir=web_dir)
    if web_dir is not None:
        login = "; log in with any user name and the API key as the password" if api_key else ""
        print(f"web chat on http://{args.host}:{args.port}/ (images written to {web_dir}{login})", flush=True)
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
    p.add_argument(
        "--api-key", default=None, metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every route but /health; the web chat asks for it "
        f"as its login password (default: ${API_KEY_ENV}, which keeps the key out of the process list; "
        "an empty string: no key)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)
