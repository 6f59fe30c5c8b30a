"""The served application: the OpenAI-compatible API (``openai_api.py``) and, at ``/``, the web chat
(``web.py``), which sends its turns through the API's scheduler. This module is the one place the two
meet, so neither imports the other's assembly.

With an API key (``ServeConfig.api_key``) the web chat, which calls the API object in-process and so
never passes the key check, asks for a login instead: any user name, the API key as the password."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.serve.openai_api import ServeConfig, create_api_app, key_matches

WEB_LOGIN_MESSAGE = "Log in with any user name and this server's API key as the password."


def create_app(
    pipeline: OrionPipeline, config: ServeConfig | None = None, *, web_dir: str | Path | None = None
) -> FastAPI:
    """The API; with ``web_dir`` (where its generated images are written) also the web chat at ``/``."""
    cfg = config or ServeConfig()
    app = create_api_app(pipeline, cfg)
    if web_dir is not None:
        import gradio as gr  # only the web chat needs Gradio (slow to import)

        from orion_mllm.serve.web import build_web_chat

        web = build_web_chat(app.state.api, web_dir)
        login: dict = {}
        if cfg.api_key:
            key = cfg.api_key

            def check_login(username: str, password: str) -> bool:
                return key_matches(password, key)

            login = {"auth": check_login, "auth_message": WEB_LOGIN_MESSAGE}
        before = list(app.router.routes)
        app = gr.mount_gradio_app(app, web, path="/", allowed_paths=[str(web_dir)], **login)
        if cfg.api_key:  # Gradio checks its login on each route that reaches the model: leave them to it
            app.state.self_authenticating.extend(r for r in app.router.routes if r not in before)
    return app
