"""An ORION model inside lmms-eval (the harness most VLM papers report with): the ``orion`` model class.

lmms-eval hands a chat model each request as structured messages (``doc_to_messages``: roles, text,
images) with the task's generation settings. Here each becomes a :class:`ChatSession` and the requests
are answered in batches by our inference engine, greedy unless the task asks for a temperature; the
harness's ``until`` strings cut the reply. Only text is answered (images are never generated here).

Registered two ways, so either entry works: ``orion eval lmms`` registers it before running the
harness's own CLI, and the package's ``lmms_eval.models`` entry point (``pyproject.toml``) lets
``lmms-eval --model orion --model_args pretrained=DIR`` find it directly. lmms-eval is an optional
extra (``pip install 'orion-mllm[eval]'``): only this module and ``orion eval lmms`` import it.

``model_args``: ``pretrained`` (model directory, required), ``decoder`` (unused for answers; accepted
so one argument string serves every command), ``device`` (default auto), ``batch_size``,
``max_new_tokens`` (default 256, when the task does not say), ``image_separator`` (text between an
image and the words after it in the same turn; default the model's own: a newline for ORION models,
as ShapesWorld trains them), ``system_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm.auto import tqdm

from orion_mllm.inference.engine import SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, UserImage

MODEL_NAME = "orion"


def manifest() -> ModelManifest:
    """What lmms-eval's model registry needs to find :class:`OrionLmms` (the entry point's payload)."""
    return ModelManifest(model_id=MODEL_NAME, chat_class_path=f"{__name__}.OrionLmms")


def register() -> None:
    """Make ``--model orion`` resolvable in this process (idempotent)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def session_from_messages(messages: Sequence[Any], system_prompt: str | None = None) -> ChatSession:
    """lmms-eval's chat messages (``ChatMessage`` objects or their dicts) as a chat session: a system
    message becomes the system prompt, images are PIL images or paths, text parts keep their order."""
    session = ChatSession(system_prompt=system_prompt)
    for message in ChatMessages(messages=list(messages)).messages:
        parts: list[Any] = []
        for content in message.content:
            if content.type == "text":
                parts.append(content.text)
            elif content.type == "image":
                image = content.url
                parts.append(UserImage(image if isinstance(image, Image.Image) else Image.open(image)))
            else:
                raise ValueError(
                    f"lmms-eval sent a {content.type!r} input; ORION models take text and images"
                )
        if message.role == "system":
            session.system_prompt = " ".join(p for p in parts if isinstance(p, str))
        else:
            session.add(message.role, parts)
    return session


def sampling_from(
    gen_kwargs: dict[str, Any], default_max_new_tokens: int
) -> tuple[SamplingConfig, list[str]]:
    """The engine's sampling settings and the stop strings for a task's ``generation_kwargs``."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0  # the harness's greedy: do_sample false wins over a temperature
    config = SamplingConfig(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens", default_max_new_tokens)),
        temperature=temperature,
        top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
        allow_images=False,
    )
    return config, [u for u in until if u]


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


class OrionLmms(lmms):
    """lmms-eval chat model for ORION (and plain Qwen2.5-VL base) model directories."""

    is_simple = False

    def __init__(
        self, pretrained: str, decoder: str | None = None, device: str = "auto", batch_size: int | str = 8,
        max_new_tokens: int | str = 256, image_separator: str | None = None, system_prompt: str | None = None,
        max_batch_size: int | None = None, **unknown: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        if unknown:
            raise ValueError(
                f"model_args for orion: unknown {sorted(unknown)} (see orion_mllm.eval.lmms_model)"
            )
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no automatic batch search: the engine's batches are cheap to pick by hand
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt
        self.pipe = OrionPipeline.load(
            pretrained, decoder, device=device or "auto",
            image_separator=image_separator,
        )  # fmt: skip

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or the task's) text answers, batched by equal generation settings, in request order."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[2].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="orion answering", disable=self.rank != 0)
        for indices in groups.values():
            config, until = sampling_from(requests[indices[0]].args[2], self.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = []
                for i in chunk:
                    _, doc_to_messages, _, doc_id, task, split = requests[i].args
                    messages = doc_to_messages(self.task_dict[task][split][doc_id])
                    session = session_from_messages(messages, self.system_prompt)
                    prompts.append(self.pipe.prompt(session, seed=doc_id))
                with torch.no_grad():
                    outs = self.pipe.engine.generate(prompts, config)
                for i, out in zip(chunk, outs, strict=True):
                    answers[i] = cut_at(self.pipe.reply_from(out).text.strip(), until)
                    self.cache_hook.add_partial(
                        "generate_until", (requests[i].args[0], requests[i].args[2]), answers[i]
                    )
                bar.update(len(chunk))
        bar.close()
        return [a or "" for a in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "orion answers generation tasks (output_type generate_until); loglikelihood tasks are not "
            "supported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("orion does not run lmms-eval's multi-round tasks yet")


__all__ = [
    "MODEL_NAME",
    "OrionLmms",
    "cut_at",
    "manifest",
    "register",
    "sampling_from",
    "session_from_messages",
]
