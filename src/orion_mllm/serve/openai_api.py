"""OpenAI-compatible HTTP API over an ``OrionPipeline`` (FastAPI).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (text and
``image_url`` data-URL parts; ``stream`` with server-sent events), ``POST /v1/images/generations``
(``b64_json``), ``POST /v1/images/edits`` (multipart image + prompt).

Generated images in a chat answer: the assistant message's ``content`` is a string (what the
official client reads), with each generated image written in place as a Markdown image whose target
is a PNG data URL: ``![image 1](data:image/png;base64,...)``. Requests go through the ``Scheduler``
(bounded queue, batching); a full queue answers 429, a request that waits past its timeout 504,
and every invalid request a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}`` naming the problem.

Access: with ``ServeConfig.api_key`` set, every request needs ``Authorization: Bearer KEY`` (401
otherwise), as vLLM's ``--api-key`` does. The check is one ASGI middleware in front of the whole app,
so a route added later is covered too; it lets through ``/health`` and the routes of a mounted app that
checks credentials itself (the web chat's login, see ``serve/app.py``), never anything under ``/v1``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import re
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from orion_mllm.inference.engine import SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, UserImage
from orion_mllm.serve.scheduler import Job, QueueFull, Scheduler

IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"}
_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.*)$", re.DOTALL)
_MARKDOWN_DATA_IMAGE = re.compile(r"!\[[^\]]*\]\(data:[^)]*\)")


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "orion"
    max_queue: int = 32
    max_batch: int = 8
    batch_wait_s: float = 0.005
    request_timeout_s: float = 300.0
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    # Clients send it as ``Authorization: Bearer KEY``; None: no key. Kept out of repr (logs, tracebacks).
    api_key: str | None = field(default=None, repr=False)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def key_matches(given: str | bytes, key: str) -> bool:
    """Whether ``given`` is ``key``, compared in constant time (on bytes, so any characters work)."""
    given = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(given, key.encode())


# Paths open without the key: the liveness probe only (load balancers and orchestrators carry no key).
OPEN_PATHS = frozenset({"/health"})


class ApiKeyCheck:
    """ASGI middleware: answer 401 to a request without ``Authorization: Bearer <key>``.

    Every path needs the key, unknown ones included (a 404 would tell which routes exist), except
    ``OPEN_PATHS`` and paths outside ``/v1`` that the router sends to a route listed in
    ``self_authenticating()`` (a mounted app with its own login). Neither the key nor what the client
    sent appears in a response or a log.
    """

    def __init__(
        self, app: ASGIApp, *, api_key: str, self_authenticating: Callable[[], list[BaseRoute]]
    ) -> None:
        if not api_key:
            raise ValueError("ApiKeyCheck: api_key must be a non-empty string")
        self.app, self.api_key, self.self_authenticating = app, api_key, self_authenticating

    def needs_key(self, scope: Scope) -> bool:
        path = get_route_path(scope)
        if path in OPEN_PATHS:
            return False
        if path == "/v1" or path.startswith("/v1/"):
            return True
        # The route the router would pick: the first full match (a wrong method only matches partly).
        delegated = self.self_authenticating()
        for route in scope["app"].router.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route not in delegated
        return True

    def problem(self, scope: Scope) -> str | None:
        """None when the request carries the key, else why not (the 401's message)."""
        header = dict(scope["headers"]).get(b"authorization")
        if header is None:
            return "missing API key: send the header 'Authorization: Bearer YOUR_KEY'"
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return "the Authorization header must use the Bearer scheme: 'Authorization: Bearer YOUR_KEY'"
        if not key_matches(token.strip(), self.api_key):
            return "incorrect API key"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.needs_key(scope):
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation (HTTP 403)
        else:
            response = _error(401, problem, code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class OrionApi:
    """The app's state: pipeline, limits, scheduler and the batch runner the scheduler calls."""

    def __init__(self, pipeline: OrionPipeline, config: ServeConfig) -> None:
        self.pipe = pipeline
        self.cfg = config
        self.scheduler = Scheduler(
            self._run_batch,
            max_queue=config.max_queue,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_s,
        )
        spec = pipeline.model.config.image_spec
        self.image_size = spec.gen_image_size

    # ------------------------------------------------------------------ input checks

    def decode_image(self, data: bytes, where: str, content_type: str | None = None) -> Image.Image:
        if content_type is not None and content_type.split(";")[0].strip() not in IMAGE_TYPES:
            raise ApiError(
                400,
                f"{where}: content type {content_type!r} is not an image type "
                f"({', '.join(sorted(IMAGE_TYPES))})",
                param=where,
            )
        if len(data) > self.cfg.max_image_bytes:
            raise ApiError(
                413,
                f"{where}: image is {len(data)} bytes, over the limit of {self.cfg.max_image_bytes}",
                param=where,
            )
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > self.cfg.max_image_pixels:
                    raise ApiError(
                        400,
                        f"{where}: image is {img.width}x{img.height} pixels, over the limit of "
                        f"{self.cfg.max_image_pixels}",
                        param=where,
                    )
                return img.convert("RGB")
        except ApiError:
            raise
        except Exception as err:
            raise ApiError(
                400, f"{where}: not a readable image ({type(err).__name__})", param=where
            ) from None

    def image_from_url(self, url: str, where: str) -> Image.Image:
        m = _DATA_URL.match(url or "")
        if not m:
            raise ApiError(
                400,
                f"{where}: only base64 data URLs (data:image/png;base64,...) are accepted; "
                "this server fetches nothing from the network",
                param=where,
            )
        try:
            raw = base64.b64decode(m.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: invalid base64 in the data URL", param=where) from None
        return self.decode_image(raw, where, m.group(1))

    def check_model(self, name: Any) -> None:
        if name != self.cfg.model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {self.cfg.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def session_from_messages(self, messages: Any) -> ChatSession:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: must be a non-empty list", param="messages")
        session = ChatSession()
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                raise ApiError(400, f"{where}: must be an object", param=where)
            role, content = msg.get("role"), msg.get("content")
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"{where}.role: {role!r} is not system, user or assistant", param=where)
            parts: list = []
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for k, part in enumerate(content):
                    pw = f"{where}.content[{k}]"
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        parts.append(str(part.get("text", "")))
                    elif kind == "image_url":
                        url = part.get("image_url")
                        url = url.get("url") if isinstance(url, dict) else url
                        if role != "user":
                            raise ApiError(400, f"{pw}: images are accepted in user messages only", param=pw)
                        parts.append(UserImage(self.image_from_url(url, pw)))
                    else:
                        raise ApiError(400, f"{pw}: type {kind!r} is not 'text' or 'image_url'", param=pw)
            elif content is not None:
                raise ApiError(400, f"{where}.content: must be a string or a list of parts", param=where)
            if role == "system":
                if i != 0:
                    raise ApiError(400, f"{where}: a system message may only come first", param=where)
                session.system_prompt = " ".join(p for p in parts if isinstance(p, str))
                continue
            if role == "assistant":  # earlier generated images come back as data URLs: drop them
                parts = [_MARKDOWN_DATA_IMAGE.sub("[image]", p) if isinstance(p, str) else p for p in parts]
            session.add(role, parts)
        if not session.turns or session.turns[-1].role != "user":
            raise ApiError(400, "messages: the last message must be from the user", param="messages")
        return session

    def check_prompt_length(self, prompt, where: str = "messages") -> None:
        n = int(prompt.input_ids.numel())
        if n > self.cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"{where}: the prompt is {n} tokens, over this server's limit of "
                f"{self.cfg.max_prompt_tokens}",
                param=where,
                code="context_length_exceeded",
            )

    def sampling(self, body: dict) -> SamplingConfig:
        max_new = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        try:
            max_new, temperature = int(max_new), float(body.get("temperature") or 0.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
            if max_new > self.cfg.max_new_tokens:
                raise ValueError(
                    f"max_tokens={max_new}: over this server's limit of {self.cfg.max_new_tokens}"
                )
            return SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_p=top_p)
        except (TypeError, ValueError) as err:
            raise ApiError(400, f"sampling settings: {err}", param="max_tokens") from None

    # ------------------------------------------------------------------ the batch runner (worker thread)

    def _run_batch(self, kind: str, jobs: list[Job]) -> list[Any]:
        pipe = self.pipe
        if kind == "chat":
            prompts = [j.payload["prompt"] for j in jobs]
            cfg = jobs[0].key

            def on_token(row: int, token: int) -> None:
                stream = jobs[row].payload.get("stream")
                if stream is not None:
                    stream(token)

            outs = pipe.engine.generate(prompts, cfg, on_token=on_token)
            results = []
            for job, out in zip(jobs, outs, strict=True):
                reply = pipe.reply_from(out)
                rendered = []
                if reply.images and pipe.decoder is not None:
                    rendered = pipe.render(
                        [im.tokens for im in reply.images], **job.payload.get("render", {})
                    )
                used = out.text_tokens + out.token_ids.count(pipe.engine.image_pad_id)
                results.append((reply, rendered, used))
            return results
        if kind == "image":
            prompts = [p for j in jobs for p in j.payload["prompts"]]
            outs = pipe.engine.generate(prompts, SamplingConfig(max_new_tokens=1, allow_images=False))
            results, k = [], 0
            for j in jobs:
                n = len(j.payload["prompts"])
                tokens = [o.images[0] for o in outs[k : k + n]]
                k += n
                results.append(pipe.render(tokens, seed=j.payload["seed"]))
            return results
        raise ValueError(f"unknown job kind {kind!r}")

    async def run(self, kind: str, key: Any, payload: dict) -> Any:
        try:
            job = self.scheduler.submit(kind, key, payload)
        except QueueFull as err:
            raise ApiError(429, str(err), code="rate_limit_exceeded", kind="rate_limit_error") from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.cfg.request_timeout_s)
        except TimeoutError:
            job.cancelled = True
            raise ApiError(
                504, f"the request took longer than {self.cfg.request_timeout_s:g} s", kind="timeout_error"
            ) from None


def _content(reply, rendered: list[Image.Image]) -> str:
    pieces, k = [], 0
    for part in reply.parts:
        if isinstance(part, str):
            pieces.append(part)
        elif k < len(rendered):
            pieces.append(f"![image {k + 1}](data:image/png;base64,{_png_b64(rendered[k])})")
            k += 1
    return "".join(pieces)


def create_api_app(pipeline: OrionPipeline, config: ServeConfig | None = None) -> FastAPI:
    """The API alone (``app.state.api`` is its ``OrionApi``); ``serve/app.py`` adds the web chat."""
    cfg = config or ServeConfig()
    api = OrionApi(pipeline, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await api.scheduler.start()
        yield
        await api.scheduler.stop()

    app = FastAPI(title="orion-mllm", lifespan=lifespan)
    app.state.api = api
    # Routes of mounted apps that check credentials themselves (the web chat's login): see ApiKeyCheck.
    app.state.self_authenticating = []
    if cfg.api_key:
        app.add_middleware(
            ApiKeyCheck, api_key=cfg.api_key, self_authenticating=lambda: app.state.self_authenticating
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error(err.status, err.message, err.param, err.code, err.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    async def json_body(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if "application/json" not in ctype:
            raise ApiError(415, f"content type {ctype or 'none'!r}: send application/json")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "queued": len(api.scheduler._pending)}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "orion-mllm"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request)
        api.check_model(body.get("model"))
        session = api.session_from_messages(body.get("messages"))
        sampling = api.sampling(body)
        prompt = pipeline.prompt(session, seed=int(body.get("seed") or 0))
        api.check_prompt_length(prompt)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": cfg.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n"

        if not body.get("stream"):
            reply, rendered, used = await api.run("chat", sampling, {"prompt": prompt})
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": cfg.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _content(reply, rendered)},
                        "finish_reason": "length" if reply.finish_reason == "length" else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": int(prompt.input_ids.numel()),
                    "completion_tokens": used,
                    "total_tokens": int(prompt.input_ids.numel()) + used,
                },
            }

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        tok = pipeline.engine.tokenizer
        special = {
            pipeline.engine.vision_start_id,
            pipeline.engine.image_pad_id,
            pipeline.engine.vision_end_id,
            *pipeline.engine.stop_ids,
        }

        def stream(token: int) -> None:  # worker thread -> event loop
            loop.call_soon_threadsafe(queue.put_nowait, token)

        task = asyncio.ensure_future(api.run("chat", sampling, {"prompt": prompt, "stream": stream}))

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            ids: list[int] = []
            sent = ""
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    token = getter.result()
                    if token not in special:
                        ids.append(token)
                        text = tok.decode(ids, skip_special_tokens=True)
                        if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                            yield chunk({"content": text[len(sent) :]})
                            sent = text
                    continue
                getter.cancel()
                break
            try:
                reply, rendered, _ = task.result()
            except ApiError as err:
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
                return
            full = _content(reply, rendered)
            if full.startswith(sent) and len(full) > len(sent):  # images (and any undecoded tail)
                yield chunk({"content": full[len(sent) :]})
            finish = "length" if reply.finish_reason == "length" else "stop"
            yield chunk({}, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def image_request(prompt: Any, n: Any, size: Any, response_format: Any, where: str = "prompt") -> int:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt: must be a non-empty string", param="prompt")
        try:
            n = int(n or 1)
        except (TypeError, ValueError):
            raise ApiError(400, f"n: {n!r} is not an integer", param="n") from None
        if not 1 <= n <= 8:
            raise ApiError(400, f"n: {n} is outside 1..8", param="n")
        want = f"{api.image_size}x{api.image_size}"
        if size not in (None, "auto", want):
            raise ApiError(400, f"size: {size!r} is not supported; this model generates {want}", param="size")
        if response_format not in (None, "b64_json"):
            raise ApiError(
                400,
                f"response_format: {response_format!r} is not supported; use 'b64_json' "
                "(this server hosts no files)",
                param="response_format",
            )
        if pipeline.decoder is None:
            raise ApiError(400, "this server has no decoder, so it cannot render images")
        return n

    def guidance_param(value: Any) -> float | None:
        """``guidance`` (an extension of OpenAI's image API): token-space CFG weight, >= 0."""
        if value is None or value == "":
            return None
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise ApiError(400, f"guidance: {value!r} is not a number", param="guidance") from None
        if not 0 <= w <= 20:
            raise ApiError(400, f"guidance: {w:g} is outside 0..20 (1: no guidance)", param="guidance")
        return w

    async def render_images(
        prompt: str, n: int, seed: int, source: Image.Image | None, guidance: float | None = None
    ):
        sources = None if source is None else [source] * n
        prompts = pipeline.image_prompts([prompt] * n, seed=seed, sources=sources, guidance=guidance)
        for p in prompts:
            api.check_prompt_length(p, "prompt")
        images = await api.run("image", None, {"prompts": prompts, "seed": seed})
        return {"created": int(time.time()), "data": [{"b64_json": _png_b64(im)} for im in images]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await json_body(request)
        api.check_model(body.get("model", cfg.model_name))
        n = image_request(body.get("prompt"), body.get("n"), body.get("size"), body.get("response_format"))
        guidance = guidance_param(body.get("guidance"))
        return await render_images(body["prompt"], n, int(body.get("seed") or 0), None, guidance)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        ctype = request.headers.get("content-type", "")
        if "multipart/form-data" not in ctype:
            raise ApiError(415, f"content type {ctype or 'none'!r}: send multipart/form-data")
        form = await request.form()
        api.check_model(form.get("model", cfg.model_name))
        upload = form.get("image") or form.get("image[]")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "image: a file part named 'image' is required", param="image")
        data = await upload.read()
        source = api.decode_image(data, "image", upload.content_type)
        n = image_request(form.get("prompt"), form.get("n"), form.get("size"), form.get("response_format"))
        guidance = guidance_param(form.get("guidance"))
        return await render_images(str(form["prompt"]), n, int(form.get("seed") or 0), source, guidance)

    return app
