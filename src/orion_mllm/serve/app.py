"""The served application: the OpenAI-compatible API (``openai_api.py``) and, at ``/``, the web chat
(``web.py``), which sends its turns through the API's scheduler. This module is the one place the two
meet, so neither imports the other's assembly."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.serve.openai_api import ServeConfig, create_api_app


def create_app(
    pipeline: OrionPipeline, config: ServeConfig | None = None, *, web_dir: str | Path | None = None
) -> FastAPI:
    """The API; with ``web_dir`` (where its generated images are written) also the web chat at ``/``."""
    app = create_api_app(pipeline, config)
    if web_dir is not None:
        import gradio as gr  # only the web chat needs Gradio (slow to import)

        from orion_mllm.serve.web import build_web_chat

        web = build_web_chat(app.state.api, web_dir)
        app = gr.mount_gradio_app(app, web, path="/", allowed_paths=[str(web_dir)])
    return app
