"""The web chat (Gradio), mounted at ``/`` of the same app as the API.

Interleaved text and images: type a message and attach images; tick "Reply with an image" (or start
the message with ``/draw``) to have the reply start with a generated image. Click any image in the
conversation to edit it: the next message is the edit instruction. Generated images appear inline
and are listed for download. Decoder steps, CFG, seed and the reply length sit in an accordion.
Every turn goes through the API's scheduler, so browser and API requests share one queue and batch.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from orion_mllm.images import load_image
from orion_mllm.inference.engine import SamplingConfig
from orion_mllm.inference.session import ChatSession, UserImage
from orion_mllm.serve.openai_api import ApiError, OrionApi


def build_web_chat(api: OrionApi, out_dir: str | Path) -> gr.Blocks:
    pipe = api.pipe
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = pipe.decoder.config.extra if pipe.decoder is not None else {}

    async def respond(
        message: dict, history: list, session, edit_src, draw, steps, cfg, seed, max_new, files
    ):
        text = (message or {}).get("text", "").strip()
        uploads = list((message or {}).get("files", []))
        session = session or ChatSession()
        history = list(history or [])
        files = list(files or [])
        if not text and not uploads:
            return history, session, edit_src, gr.update(value=None), files, ""
        open_image = bool(draw) or text.startswith("/draw")
        if text.startswith("/draw"):
            text = text.removeprefix("/draw").strip()
        parts: list[Any] = []
        if edit_src is not None:  # an edit: the selected image, then the instruction
            parts.append(UserImage(load_image(edit_src, where="edit source"), edit_src))
            history.append({"role": "user", "content": {"path": edit_src}})
            open_image = True
        for f in uploads:
            parts.append(UserImage(load_image(f, where="upload"), f))
            history.append({"role": "user", "content": {"path": f}})
        if text:
            parts.append(text)
            history.append({"role": "user", "content": text})
        session.add("user", parts)
        sampling = SamplingConfig(max_new_tokens=int(max_new))
        try:
            prompt = pipe.prompt(session, open_image=open_image, seed=int(seed))
            api.check_prompt_length(prompt)
            render = {"steps": int(steps), "cfg_scale": float(cfg), "seed": int(seed)}
            reply, rendered, _ = await api.run("chat", sampling, {"prompt": prompt, "render": render})
        except ApiError as err:
            session.turns.pop()
            history.append({"role": "assistant", "content": f"Error: {err.message}"})
            return history, session, None, gr.update(value=None), files, ""
        session.add("assistant", reply.parts)
        k = 0
        for part in reply.parts:
            if isinstance(part, str):
                history.append({"role": "assistant", "content": part})
            elif k < len(rendered):
                path = out / f"{uuid.uuid4().hex[:12]}.png"
                rendered[k].save(path)
                part.path = str(path)
                files.append(str(path))
                history.append({"role": "assistant", "content": {"path": str(path)}})
                k += 1
            else:
                history.append({"role": "assistant", "content": "[image generated; no decoder to render it]"})
        if not reply.parts:
            history.append({"role": "assistant", "content": "(empty reply)"})
        return history, session, None, gr.update(value=None), files, ""

    def select(evt: gr.SelectData, history: list):
        # An image message arrives as {"component": "image", "value": {"path": ...}} (or a file dict).
        value = evt.value if isinstance(evt.value, dict) else {}
        inner = value.get("value") if isinstance(value.get("value"), dict) else value.get("file")
        file = inner if isinstance(inner, dict) else value
        path = file.get("path") if isinstance(file, dict) else None
        if not path:
            return None, "Only images can be edited: click an image in the conversation."
        return path, f"Editing the selected image: type an instruction ({Path(path).name})."

    def clear():
        return [], ChatSession(), None, gr.update(value=None), [], ""

    with gr.Blocks(title="ORION chat") as demo:
        gr.Markdown(f"## ORION: `{api.cfg.model_name}` understands and generates images")
        session = gr.State(None)
        edit_src = gr.State(None)
        chatbot = gr.Chatbot(elem_id="chat", height=460, allow_file_downloads=True)
        note = gr.Markdown("", elem_id="edit-note")
        box = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", show_label=False, elem_id="prompt",
            placeholder="Message (attach images; '/draw ...' or tick the box to get an image back)",
        )  # fmt: skip
        with gr.Row():
            draw = gr.Checkbox(label="Reply with an image", elem_id="draw")
            clear_btn = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            steps = gr.Slider(1, 100, value=int(extra.get("sample_steps", 20)), step=1, label="Decoder steps")
            cfg = gr.Slider(0.0, 10.0, value=float(extra.get("cfg_scale", 1.0)), step=0.5, label="CFG scale")
            seed = gr.Number(value=0, precision=0, label="Seed")
            max_new = gr.Slider(1, api.cfg.max_new_tokens, value=128, step=1, label="Max new tokens")
        files = gr.File(label="Generated images", file_count="multiple", elem_id="downloads")
        box.submit(
            respond,
            [box, chatbot, session, edit_src, draw, steps, cfg, seed, max_new, files],
            [chatbot, session, edit_src, box, files, note],
        )
        chatbot.select(select, [chatbot], [edit_src, note])
        clear_btn.click(clear, None, [chatbot, session, edit_src, box, files, note])
    return demo
