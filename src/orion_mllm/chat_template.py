"""Conversations rendered by a model directory's own chat template, and the spans the assistant says.

Prompts and training sequences are the text the directory's jinja template writes (the processor's
template, else the tokenizer's), rendered as transformers' ``apply_chat_template`` renders it: a
fine-tune's system prompt, role markers and turn ends all come from its template, and no system
prompt is added that the template does not add itself (Qwen2.5-VL's stock template adds "You are a
helpful assistant." on its own). Messages are passed in the processor's multimodal form, content a
list of ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` items; a template that only
reads string content gets text-only messages as strings instead. Qwen2.5-VL's templates write each
image as ``<|vision_start|><|image_pad|><|vision_end|>``; ``expand_image_pads`` then widens the one
pad to the image's number of visual tokens, as ``Qwen2_5_VLProcessor`` does.

Training labels need the character spans the assistant says (``ChatTemplate.assistant_spans``).
With ``{% generation %}`` markers in the template, those spans. Otherwise each assistant turn is
found by rendering the conversation before it, before it plus the generation prompt, and through
it: the turn starts where its rendering departs from the generation prompt (so the role header is
never a target) and ends with its first end-of-turn (stop) token, which is a target; what follows
(a newline) is not. A template whose rendering of a conversation prefix is not a prefix of the
longer rendering (one that rewrites earlier turns) cannot be split this way; ``ChatTemplateError``
then names the directory.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
Messages = list[dict[str, Any]]


class ChatTemplateError(ValueError):
    """The model directory's chat template cannot render or split a conversation (a setup problem, not a
    bad record: training stops on it instead of skipping the record)."""


class ChatTemplate:
    """One model directory's chat template: rendering, and the assistant spans training supervises."""

    def __init__(
        self,
        template: str | None,
        *,
        source: str,
        stop_tokens: Sequence[str],
        template_vars: Mapping[str, Any] | None = None,
    ) -> None:
        if not template:
            raise ChatTemplateError(f"{source}: no chat template (chat_template.jinja or the tokenizer's)")
        self.template = template
        self.source = source
        self.stop_tokens = tuple(stop_tokens)
        # What apply_chat_template passes besides the messages (bos_token, eos_token, ...).
        self.template_vars = dict(template_vars or {})
        self.has_generation_markers = bool(_GENERATION_TAG.search(template))
        self._prefer_strings = False  # learned from the first conversation a list form cannot render

    # ------------------------------------------------------------------ rendering

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        rendered, _ = render_jinja_template(
            [messages], chat_template=self.template, add_generation_prompt=add_generation_prompt,
            **self.template_vars,
        )  # fmt: skip
        return rendered[0]

    def content_form(self, messages: Messages) -> tuple[Messages, str]:
        """The messages as this template reads them, and their rendering (no generation prompt): the
        multimodal list form, or (for a template that renders no text from lists) text-only messages as
        plain strings. Checked on this conversation: every text part must appear, in order."""
        forms = [messages, _text_only_as_strings(messages)]
        if self._prefer_strings:
            forms.reverse()
        failure = "it leaves out message text"
        for form in forms:
            try:
                text = self._render(form, add_generation_prompt=False)
            except (TemplateError, TypeError, KeyError, AttributeError) as err:
                failure = f"{type(err).__name__}: {err}"
                continue
            if _writes_all_text(text, messages):
                self._prefer_strings = form is not messages
                return form, text
        raise ChatTemplateError(
            f"the chat template of {self.source} cannot render this conversation: {failure}"
        )

    def render(self, messages: Messages, *, add_generation_prompt: bool = False) -> str:
        """The template's text for a conversation (one ``<|image_pad|>`` per image, as templates write)."""
        form, text = self.content_form(messages)
        if not add_generation_prompt:
            return text
        try:
            return self._render(form, add_generation_prompt)
        except (TemplateError, TypeError, KeyError, AttributeError) as err:
            raise ChatTemplateError(f"the chat template of {self.source} failed: {err}") from None

    # ------------------------------------------------------------------ assistant spans

    def assistant_spans(self, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and, in it, the character spans of what the assistant says."""
        form, full = self.content_form(messages)
        try:
            if self.has_generation_markers:
                rendered, indices = render_jinja_template(
                    [form], chat_template=self.template, return_assistant_tokens_mask=True,
                    **self.template_vars,
                )  # fmt: skip
                return rendered[0], sorted((int(a), int(b)) for a, b in indices[0] if b > a)
            spans = []
            for i, message in enumerate(form):
                if message["role"] != "assistant":
                    continue
                before = self._render(form[:i], False)
                prompt = self._render(form[:i], True)
                through = self._render(form[: i + 1], False)
                if not (through.startswith(before) and full.startswith(through)):
                    raise ChatTemplateError(
                        f"the chat template of {self.source} cannot be split into turns: rendering message "
                        f"{i} changes the text of the turns before it, so the assistant's part cannot be "
                        "found (use a template whose turns only append, or mark them with {% generation %})"
                    )
                start = self._turn_start(before, prompt, through)
                end = start + self._turn_end(through[start:])
                if end > start:
                    spans.append((start, end))
        except (TemplateError, TypeError, KeyError, AttributeError) as err:
            raise ChatTemplateError(f"the chat template of {self.source} failed: {err}") from None
        return full, spans

    @staticmethod
    def _turn_start(before: str, prompt: str, through: str) -> int:
        """Where the assistant's own text starts: after the generation prompt's header (found after the
        earlier turns: a template may add a default system turn once a first message exists), else
        where the turn departs from the generation prompt (one that opens the reply with more than the
        turns' header, e.g. an empty reasoning block)."""
        header = prompt[len(before) :] if prompt.startswith(before) else ""
        k = through.find(header, len(before)) if header else -1
        if k >= 0:
            return k + len(header)
        return max(_common_prefix_length(prompt, through), len(before))

    def _turn_end(self, turn: str) -> int:
        """Length of an assistant turn's supervised part: through its first stop token (the model must
        learn to end its turn), else all but trailing whitespace."""
        hits = [(k, k + len(tok)) for tok in self.stop_tokens if (k := turn.find(tok)) >= 0]
        return min(hits)[1] if hits else len(turn.rstrip())


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _text_only_as_strings(messages: Messages) -> Messages:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list) and all(item.get("type") == "text" for item in content):
            content = "".join(item["text"] for item in content)
        out.append({**message, "content": content})
    return out


def _writes_all_text(rendered: str, messages: Messages) -> bool:
    """Every text part (stripped: templates may trim) appears in the rendering, in order, and no content
    list was printed as it is (a string-only template writes ``[{'type': 'text', ...}]``)."""
    if "{'type': '" in rendered:
        return False
    pos = 0
    for message in messages:
        for item in message["content"]:
            text = item.get("text", "").strip() if item.get("type") == "text" else ""
            if text:
                k = rendered.find(text, pos)
                if k < 0:
                    return False
                pos = k + len(text)
    return True


def expand_image_pads(
    text: str, counts: Sequence[int], pad: str = "<|image_pad|>"
) -> tuple[str, Callable[[int], int]]:
    """Widen the k-th ``pad`` in ``text`` to ``counts[k]`` copies (what the Qwen2.5-VL processor does to
    the template's text), and map an offset in ``text`` to the same place in the result."""
    pieces = text.split(pad)
    if len(pieces) != len(counts) + 1:
        raise ValueError(f"the chat template wrote {len(pieces) - 1} {pad} for {len(counts)} image(s)")
    starts, pos = [], 0
    for piece in pieces[:-1]:
        pos += len(piece)
        starts.append(pos)
        pos += len(pad)
    growth = list(itertools.accumulate((n - 1) * len(pad) for n in counts))

    def shift(offset: int) -> int:
        k = bisect.bisect_left(starts, offset)  # pads that start before the offset
        return offset + (growth[k - 1] if k else 0)

    expanded = pieces[0] + "".join(pad * n + rest for n, rest in zip(counts, pieces[1:], strict=True))
    return expanded, shift
