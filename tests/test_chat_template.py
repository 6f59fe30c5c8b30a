"""Prompts and training sequences follow the model directory's own chat template (issue 15).

Parity: three tiny Qwen2.5-VL directories written by plain transformers (``save_pretrained`` of a
random model and of a processor carrying its own tokenizer and template): Qwen's stock template, the
same without its default system turn, and one with other role markers, another default system
line and another end-of-turn token. On each, our prompt ids and greedy continuation equal
transformers' (``apply_chat_template`` + the processor's inputs, with ``image_grid_thw`` for M-RoPE,
+ ``generate(do_sample=False)``) for one image, two images, a system prompt and a multi-turn chat.

Training: under a custom template exactly the assistant's tokens and its end-of-turn token are
labelled (checked against a mask written out by hand); ``{% generation %}`` markers give the same
labels; a template that cannot be split into turns is refused with the directory's name; and for
the stock template (ShapesWorld) the encodings are the ones the hand-written builder produced
before templates were rendered (fixture).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orion_mllm.chat_template import ChatTemplateError
from orion_mllm.cli import main
from orion_mllm.config import get_preset
from orion_mllm.data.records import encode_record
from orion_mllm.demo import draw_shape
from orion_mllm.inference.chat import ChatRepl
from orion_mllm.inference.engine import SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, UserImage
from orion_mllm.model.backbone import build_backbone, build_processor, load_processor
from orion_mllm.model.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE
from orion_mllm.sequence import IGNORE_INDEX, SequenceBuilder
from test_parity import plain_transformers

FIXTURE = Path(__file__).parent / "fixtures" / "stock_template_encodings.json"
DEFAULT_SYSTEM = "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"  # noqa: E501
assert DEFAULT_SYSTEM in QWEN2_5_VL_CHAT_TEMPLATE
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)
TEMPLATES = {
    "stock": QWEN2_5_VL_CHAT_TEMPLATE,
    # The case: a fine-tune whose template has no system turn of its own.
    "no_system": QWEN2_5_VL_CHAT_TEMPLATE.replace(DEFAULT_SYSTEM, ""),
    # Other role markers, another default system line, <|endoftext|> ends a turn.
    "roles": (
        "{% if messages[0]['role'] != 'system' %}A chat between a curious human and an assistant.\n\n"
        "{% endif %}{% for message in messages %}{% if message['role'] == 'system' %}"
        + _CONTENT
        + "{{ '\\n\\n' }}{% else %}{{ '### Human:\n' if message['role'] == 'user' else '### Assistant:\n' }}"
        + _CONTENT
        + "<|endoftext|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
    ),
}
MAX_NEW = 12


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _write_qwen_dir(path: Path, template: str) -> Path:
    """A tiny random Qwen2.5-VL directory written by transformers' own save_pretrained."""
    backbone, processor = build_backbone(get_preset("micro"), seed=0)
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    tok = processor.tokenizer
    # transformers stops on generation_config's eos; make it the engine's stop tokens.
    backbone.generation_config.eos_token_id = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    backbone.save_pretrained(path)
    processor.save_pretrained(path)
    # Our processor is the stock one minus its video processor (no torchvision here); name the stock
    # class, as Qwen2_5_VLProcessor.save_pretrained writes it, so AutoProcessor reads it where it can.
    config = json.loads((path / "processor_config.json").read_text())
    config["processor_class"] = "Qwen2_5_VLProcessor"
    (path / "processor_config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def qwen(request, tmp_path_factory):
    """(directory, transformers model, transformers processor, our pipeline) for one template."""
    path = _write_qwen_dir(tmp_path_factory.mktemp(request.param) / "qwen", TEMPLATES[request.param])
    model, processor = plain_transformers(str(path))
    return request.param, path, model, processor, OrionPipeline.load(path)


IMAGES = {"a": _image(1, (64, 48)), "b": _image(2, (32, 80))}
CASES = {
    # (system prompt, turns); a turn is (role, [image key or text, ...])
    "one_image": (None, [("user", ["a", "what colour is the shape in this picture ?"])]),
    "two_images": (None, [("user", ["a", "b", "which picture has more shapes ?"])]),
    "system": ("Answer in one word.", [("user", ["a", "what colour is it ?"])]),
    "multi_turn": (
        None,
        [
            ("user", ["a", "what colour is the shape ?"]),
            ("assistant", ["It is red."]),
            ("user", ["b", "and in this one ?"]),
        ],
    ),
}


def _reference(model, processor, system, turns):
    """transformers alone: the template's text, the processor's inputs, greedy generate."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    images = []
    for role, parts in turns:
        content = []
        for p in parts:
            if p in IMAGES:
                content.append({"type": "image"})
                images.append(IMAGES[p])
            else:
                content.append({"type": "text", "text": p})
        messages.append({"role": role, "content": content})
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    assert "image_grid_thw" in inputs  # what M-RoPE needs
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    # <|vision_start|> in an answer would open an image in our engine (ORION's generation) and is masked
    # out of `ask`; the random model's seed is one whose greedy answers hold none.
    assert processor.tokenizer.convert_tokens_to_ids("<|vision_start|>") not in new
    return text, inputs["input_ids"][0].tolist(), new


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompts_and_greedy_replies_match_transformers(qwen, case):
    name, _, model, processor, pipe = qwen
    system, turns = CASES[case]
    text, ref_ids, ref_new = _reference(model, processor, system, turns)

    session = ChatSession(system_prompt=system)
    for role, parts in turns:
        session.add(role, [UserImage(IMAGES[p]) if p in IMAGES else p for p in parts])
    prompt = pipe.prompt(session)
    assert prompt.input_ids.tolist() == ref_ids
    gen = pipe.engine.generate([prompt], SamplingConfig(max_new_tokens=MAX_NEW, allow_images=False))[0]
    assert gen.token_ids == ref_new[: len(gen.token_ids)]
    assert len(gen.token_ids) == len(ref_new)  # both stopped at the same place
    reply = pipe.reply_from(gen)
    assert reply.text == processor.tokenizer.decode(ref_new, skip_special_tokens=True)

    # Each template really writes its own format: no system prompt invented, markers its own.
    has_default = "You are a helpful assistant." in text
    assert has_default == (name == "stock" and system is None)
    assert ("### Human:" in text) == (name == "roles")
    if system:
        assert system in text


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_orion_ask_cli_matches_transformers(qwen, tmp_path, capsys, system):
    """The issue's reproduction: `orion ask` on the directory == transformers' greedy answer."""
    _, path, model, processor, _ = qwen
    IMAGES["a"].save(tmp_path / "probe.png")
    question = "what colour is the shape in this picture ?"
    argv = ["ask", "--model", str(path), "--image", str(tmp_path / "probe.png"), question,
            "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    assert main(argv + (["--system", system] if system else [])) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    _, _, new = _reference(model, processor, system, [("user", ["a", question])])
    assert ours == processor.tokenizer.decode(new, skip_special_tokens=True)


def test_system_prompt_reaches_chat_generate_and_edit(qwen, micro_model, tmp_path, monkeypatch, capsys):
    _, path, _, _, pipe = qwen
    repl = ChatRepl(pipe, tmp_path, SamplingConfig(max_new_tokens=2, allow_images=False),
                    stdin=io.StringIO("hi\n/reset\n"), stdout=io.StringIO(), system="Be terse.")  # fmt: skip
    assert repl.run() == 0 and repl.session.system_prompt == "Be terse."  # kept across /reset
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(path), "--system", "Be terse.", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    # generate / edit prompts (an ORION model) open with the system turn, rendered by the template.
    orion = OrionPipeline(micro_model)
    tok = orion.engine.tokenizer
    for source in (None, IMAGES["a"]):
        sources = None if source is None else [source]
        (prompt,) = orion.image_prompts(["a red circle"], system="Draw plainly.", sources=sources)
        assert tok.decode(prompt.input_ids.tolist()).startswith("<|im_start|>system\nDraw plainly.<|im_end|>")


# ----------------------------------------------------------------------------- training labels


@pytest.fixture(scope="module")
def micro_processor():
    return build_processor(get_preset("micro"))


def _builder(processor, template: str) -> SequenceBuilder:
    processor.chat_template = template
    return SequenceBuilder(processor, get_preset("micro").image_spec)


def test_custom_template_labels_exactly_the_assistant_tokens(micro_processor):
    builder = _builder(micro_processor, TEMPLATES["roles"])
    spec = get_preset("micro").image_spec
    shown, drawn = _image(3, (64, 48)), draw_shape("red", "circle")
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": shown},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Draw a red circle."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Here:"},
                {"type": "image", "image": drawn},
                {"type": "text", "text": "Done."},
            ],
        },
    ]  # fmt: skip
    enc = encode_record(builder, conv)
    n_shown = (64 // spec.factor) * (48 // spec.factor)
    n_drawn = spec.gen_num_tokens
    assert enc.image_num_tokens.tolist() == [n_shown, n_drawn]
    pads = lambda n: "<|image_pad|>" * n  # noqa: E731
    # The rendering, piece by piece, and whether each piece is the assistant's (True) - by hand.
    pieces = [
        ("Be brief.\n\n", False),
        ("### Human:\n", False), ("<|vision_start|>", False), (pads(n_shown), False),
        ("<|vision_end|>", False), ("What colour?", False), ("<|endoftext|>", False), ("\n", False),
        ("### Assistant:\n", False), ("Blue.", True), ("<|endoftext|>", True), ("\n", False),
        ("### Human:\n", False), ("Draw a red circle.", False), ("<|endoftext|>", False), ("\n", False),
        ("### Assistant:\n", False), ("Here:", True), ("<|vision_start|>", True), (pads(n_drawn), False),
        ("<|vision_end|>", True), ("Done.", True), ("<|endoftext|>", True), ("\n", False),
    ]  # fmt: skip
    tok = builder.tokenizer
    ids, mask = [], []
    for text, supervised in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [supervised] * len(piece)
    assert enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=True)]
    # ORION's generation target: <|vision_start|> predicts v_1, v_j predicts v_{j+1}.
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    first_pad = [k for k, i in enumerate(ids) if i == image_pad][n_shown]
    assert enc.visual_positions.tolist() == list(range(first_pad - 1, first_pad - 1 + n_drawn))
    # A prompt from the same template: no labels, ends with the template's generation prompt.
    prompt = encode_record(builder, conv[:4], add_generation_prompt=True)
    assert tok.decode(prompt.input_ids.tolist()).endswith("<|endoftext|>\n### Assistant:\n")
    assert (prompt.labels == IGNORE_INDEX).all()


def test_generation_markers_give_the_same_labels(micro_processor, images):
    """A template with {% generation %} blocks: the blocks are the spans (here the stock ones)."""
    marked = (
        "{% for message in messages %}" + DEFAULT_SYSTEM + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "<|im_end|>{% endgeneration %}"
        "{% else %}" + _CONTENT + "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conv = [
        {"role": "user", "content": "What colour is a ripe tomato?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "image", "image": images["wide"]},
                                     {"type": "text", "text": "Draw it bigger."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure:"},
                                          {"type": "image", "image": images["red_circle"]}]},
    ]  # fmt: skip
    stock = encode_record(_builder(micro_processor, QWEN2_5_VL_CHAT_TEMPLATE), conv)
    builder = _builder(micro_processor, marked)
    assert builder.template.has_generation_markers
    ours = encode_record(builder, conv)
    assert torch.equal(ours.input_ids, stock.input_ids) and torch.equal(ours.labels, stock.labels)
    assert torch.equal(ours.visual_positions, stock.visual_positions)


def test_unsplittable_template_is_refused_naming_the_directory(micro_processor, tmp_path, images):
    # Writes the number of messages first: every longer conversation rewrites the earlier text.
    template = "{{ messages | length }} messages\n" + QWEN2_5_VL_CHAT_TEMPLATE
    micro_processor.chat_template = template
    micro_processor.save_pretrained(tmp_path / "odd")
    builder = SequenceBuilder(load_processor(tmp_path / "odd"), get_preset("micro").image_spec)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    message = f"chat template of {tmp_path / 'odd'} cannot be split into turns"
    with pytest.raises(ChatTemplateError, match=message):
        encode_record(builder, conv)
    # Prompts need no split: inference still works with such a template.
    prompt = encode_record(builder, conv[:1], add_generation_prompt=True)
    assert builder.tokenizer.decode(prompt.input_ids.tolist()).startswith("1 messages\n")
    # Image generation needs <|vision_start|> before a generated image's pads.
    bare = QWEN2_5_VL_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>")
    draw = [
        {"role": "user", "content": "Draw."},
        {"role": "assistant", "content": [{"type": "image", "image": images["red_circle"]}]},
    ]
    with pytest.raises(ChatTemplateError, match="does not write an assistant image"):
        encode_record(_builder(micro_processor, bare), draw)


def test_string_only_template_gets_string_content(micro_processor):
    """A text template that reads message['content'] as a string renders text-only turns as text."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    builder = _builder(micro_processor, template)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode_record(builder, conv)
    assert builder.tokenizer.decode(enc.input_ids.tolist()) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


# ----------------------------------------------------------------------------- stock template fixture


def stock_conversations() -> list[list[dict]]:
    """Conversations whose encodings the fixture pins (only image sizes matter to the ids)."""
    img = lambda w, h: {"type": "image", "image": Image.new("RGB", (w, h), "white")}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [img(64, 48), text("\nWhat colour is the star?")]},
            {"role": "assistant", "content": "Yellow."},
            {"role": "user", "content": "And how many circles are there?"},
            {"role": "assistant", "content": " Two, next to each other.\n"},
        ],
        [
            {"role": "user", "content": "Draw a red circle above a blue square."},
            {"role": "assistant", "content": [text("Here:"), img(48, 48), text("It is drawn.")]},
        ],
        [
            {"role": "user", "content": [img(80, 32), img(32, 32), text("\nMake the circle green.")]},
            {"role": "assistant", "content": [img(48, 48)]},
        ],
        [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    ]


def test_stock_template_encodings_are_unchanged(micro_model):
    """ShapesWorld models keep Qwen's stock template: ids and labels are those of the hand-written
    builder this replaced (tests/fixtures, written by it at 9d20f6c)."""
    expected = json.loads(FIXTURE.read_text())
    builder = micro_model.sequence_builder()
    for conv, want in zip(stock_conversations(), expected, strict=True):
        enc = encode_record(builder, conv)
        assert enc.input_ids.tolist() == want["input_ids"]
        assert enc.labels.tolist() == want["labels"]
        prompt = encode_record(builder, conv[:-1] if len(conv) > 1 else conv, add_generation_prompt=True)
        assert prompt.input_ids.tolist() == want["prompt_ids"]
