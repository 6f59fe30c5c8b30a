"""Inference: the KV-cached engine against teacher forcing and transformers, batching, chat sessions, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from orion_mllm.cli import main
from orion_mllm.data.records import encode_record
from orion_mllm.inference.chat import ChatRepl
from orion_mllm.inference.engine import Engine, SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, GeneratedImage, UserImage
from orion_mllm.model.orion import OrionModel
from orion_mllm.sequence import mrope_positions
from serve_utils import save_with_decoder


@pytest.fixture(scope="module")
def micro() -> OrionModel:
    return OrionModel.from_preset("micro", seed=3).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, micro) -> str:
    """A micro ORION model directory carrying its decoder in decoder/."""
    return save_with_decoder(micro, tmp_path_factory.mktemp("infer") / "model")


def _image(seed: int, size=(64, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _session(*parts) -> ChatSession:
    s = ChatSession()
    s.add("user", list(parts))
    return s


def _fed(out):
    """The tokens an output actually fed (the final stop / length token is recorded but not fed)."""
    return out.token_ids[:-1], out.position_ids[:-1]


def test_kv_cached_decoding_equals_teacher_forced_forward_and_training_positions(micro):
    pipe = OrionPipeline(micro)
    engine = pipe.engine
    prompt = pipe.prompt(_session("Draw a red circle."), open_image=True)
    out = engine.generate([prompt], SamplingConfig(max_new_tokens=6, allow_images=False))[0]
    n = engine.image_tokens
    assert len(out.images) == 1 and out.images[0].shape == (n, micro.hidden_size)
    ids, pos = _fed(out)
    assert ids[:n] == [engine.image_pad_id] * n and ids[n] == engine.vision_end_id

    # The whole sequence (prompt + every fed token), teacher-forced in one pass.
    full_ids = torch.cat([prompt.input_ids, torch.tensor(ids)])
    full_pos = torch.cat([prompt.position_ids, torch.tensor(pos).T], dim=1)
    # Positions: exactly what the training code assigns to this sequence.
    mm = (full_ids == engine.image_pad_id).int()
    grid = torch.tensor([micro.config.image_spec.gen_grid_thw])
    assert torch.equal(full_pos, mrope_positions(mm, grid, micro.config.image_spec.merge_size))
    lm = micro.backbone.model.language_model
    with torch.no_grad():
        embeds = lm.embed_tokens(full_ids).clone()
        embeds[mm.bool()] = out.images[0]
        hidden = lm(
            inputs_embeds=embeds[None], position_ids=full_pos[:, None], use_cache=False
        ).last_hidden_state[0]
        start = prompt.input_ids.numel() - 1  # <|vision_start|> predicts v_1, v_j predicts v_{j+1}
        regressed = micro.predict_visual_tokens(hidden[start : start + n])
        torch.testing.assert_close(regressed, out.images[0], atol=1e-5, rtol=1e-5)
        # Greedy text after the image: each token is the argmax of the teacher-forced logits before it.
        logits = micro.backbone.lm_head(hidden)
        after = prompt.input_ids.numel() + n  # the position of <|vision_end|>
        expected = logits[after : full_ids.numel()].argmax(-1).tolist()
        assert out.token_ids[n + 1 :] == expected
    # And the no-cache engine (full recompute per step) gives the same continuation.
    ref = Engine(micro, kv_cache=False).generate(
        [prompt], SamplingConfig(max_new_tokens=6, allow_images=False)
    )[0]
    assert ref.token_ids == out.token_ids and ref.position_ids == out.position_ids
    torch.testing.assert_close(ref.images[0], out.images[0], atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_at_a_time(micro):
    pipe = OrionPipeline(micro)
    prompts = [
        pipe.prompt(_session("Draw a blue square please."), open_image=True, seed=1),
        pipe.prompt(_session(UserImage(_image(0)), "What is in this picture?"), seed=2),
        pipe.prompt(_session("Hi"), seed=3),
    ]
    for cfg in (
        SamplingConfig(max_new_tokens=5),
        SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9),
    ):
        batched = pipe.engine.generate(prompts, cfg)
        for p, b in zip(prompts, batched, strict=True):
            (alone,) = pipe.engine.generate([p], cfg)
            assert alone.token_ids == b.token_ids and alone.position_ids == b.position_ids
            assert alone.finish_reason == b.finish_reason and len(alone.images) == len(b.images)
            for x, y in zip(alone.images, b.images, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # Sampling depends on the seed; greedy does not.
    warm = SamplingConfig(max_new_tokens=8, temperature=2.0)
    a = pipe.engine.generate([dataclasses.replace(prompts[2], seed=5)], warm)[0].token_ids
    b = pipe.engine.generate([dataclasses.replace(prompts[2], seed=6)], warm)[0].token_ids
    assert a != b


def test_chat_keeps_generated_tokens_in_context_and_sessions_round_trip(micro, tmp_path, monkeypatch):
    pipe = OrionPipeline(micro)
    session = ChatSession()
    session.add("user", ["Draw a green triangle."])
    reply = pipe.reply(session, SamplingConfig(max_new_tokens=3), open_image=True)
    assert len(reply.images) == 1 and session.turns[-1].role == "assistant"
    generated = reply.images[0].tokens
    session.add("user", [UserImage(_image(1), "x.png"), "How many triangles are there?"])
    prompt = pipe.prompt(session)
    # The generated image is in the context as its predicted tokens, then the user's image encoded.
    n = generated.shape[0]
    assert torch.equal(prompt.visual_tokens[:n], generated)
    ids = prompt.input_ids.tolist()
    assert ids.count(pipe.engine.vision_start_id) == 2
    answer = pipe.reply(session, SamplingConfig(max_new_tokens=4))
    assert answer.finish_reason in ("stop", "length")

    path = session.save(tmp_path / "s")
    back = ChatSession.load(path)
    p2 = pipe.prompt(back)
    p1 = pipe.prompt(session)
    assert torch.equal(p1.input_ids, p2.input_ids) and torch.equal(p1.position_ids, p2.position_ids)
    assert torch.equal(p1.visual_tokens, p2.visual_tokens)
    # A failed save never clobbers the earlier one; a broken file is named.
    before = path.read_text()

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr("orion_mllm.inference.session.save_file", disk_full)
    session.add("user", ["one more turn"])
    with pytest.raises(OSError, match="No space"):
        session.save(path)
    assert path.read_text() == before and len(ChatSession.load(path).turns) == 4
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "bad.safetensors").write_bytes(path.with_suffix(".safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        ChatSession.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="stored tokens have shape"):
        pipe.prompt(_session_with_tokens(torch.zeros(3, 5)))


def test_prompts_use_the_training_data_layout(micro):
    """An ORION model's prompt for image + question is token-for-token the LLaVA-style training record."""
    pipe = OrionPipeline(micro)
    img = _image(7)
    prompt = pipe.prompt(_session(UserImage(img), "What colour is the star?"))
    record = {
        "conversations": [{"from": "human", "value": "<image>\nWhat colour is the star?"}],
        "image": img,
    }
    enc = encode_record(micro.sequence_builder(), record, add_generation_prompt=True)
    assert prompt.input_ids.tolist() == enc.input_ids.tolist()
    assert torch.equal(prompt.position_ids, enc.position_ids[1:])


def _session_with_tokens(tokens):
    s = ChatSession()
    s.add("user", ["draw"])
    s.add("assistant", [GeneratedImage(tokens)])
    s.add("user", ["and?"])
    return s


def test_ask_matches_transformers_greedy_generate(tmp_path, capsys):
    """`orion ask` on a plain transformers Qwen2.5-VL directory == transformers' own greedy generate."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from orion_mllm.config import get_preset
    from orion_mllm.model.backbone import build_backbone

    backbone, processor = build_backbone(get_preset("micro"), seed=11)
    backbone.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    img = _image(4, size=(56, 84))
    img.save(tmp_path / "img.png")
    question = "What colour is the shape?"
    assert main(["ask", "--model", str(tmp_path / "qwen"), "--image", str(tmp_path / "img.png"), question,
                 "--max-new-tokens", "12"]) == 0  # fmt: skip
    ours = capsys.readouterr().out.rstrip("\n")

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "qwen").eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text], images=[Image.open(tmp_path / "img.png").convert("RGB")], return_tensors="pt"
    )
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert ours == processor.tokenizer.decode(new, skip_special_tokens=True)
    # Token-level too: the engine's prompt is transformers' prompt, its continuation transformers'.
    pipe = OrionPipeline.load(tmp_path / "qwen")
    prompt = pipe.prompt(_session(UserImage(Image.open(tmp_path / "img.png").convert("RGB")), question))
    assert prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    gen = pipe.engine.generate([prompt], SamplingConfig(max_new_tokens=12))[0]
    assert gen.token_ids == new.tolist()[: len(gen.token_ids)]


def test_generate_edit_and_chat_cli(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.png"
    assert (
        main(["generate", "--model", model_dir, "a red circle", "-o", str(out), "--n", "2", "--steps", "2"])
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == [str(tmp_path / "g_0.png"), str(tmp_path / "g_1.png")]
    assert Image.open(res["images"][0]).size == (48, 48)
    assert main(["generate", "--model", model_dir, "a red circle", "-o", str(out), "--n", "2", "--steps", "2",
                 "--elaborate", "--seed", "3"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert len(res["prompts"]) == 2 and res["prompts"][0] != res["prompts"][1]  # sampled elaborations
    _image(2).save(tmp_path / "src.png")
    assert main(["edit", "--model", model_dir, "--image", str(tmp_path / "src.png"), "make it blue",
                 "-o", str(tmp_path / "e.png"), "--steps", "2"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "e.png").size == (48, 48)
    capsys.readouterr()

    pipe = OrionPipeline.load(model_dir)
    script = (f"/draw a yellow star\n/image {tmp_path / 'src.png'}\nwhat is this?\n"
              f"/save {tmp_path / 'chat'}\n/reset\n/load {tmp_path / 'chat'}\n/quit\n")  # fmt: skip
    stdout = io.StringIO()
    repl = ChatRepl(pipe, tmp_path / "imgs", SamplingConfig(max_new_tokens=3), stdin=io.StringIO(script),
                    stdout=stdout)  # fmt: skip
    assert repl.run() == 0
    text = stdout.getvalue()
    assert (
        f"[image: {tmp_path / 'imgs' / 'image_000.png'}]" in text
        and (tmp_path / "imgs/image_000.png").is_file()
    )
    assert "attached" in text and "saved" in text and "loaded 4 turns" in text
    assert repl.session.turns[1].parts[0].path.endswith("image_000.png")

    # `orion chat` itself with piped input; a failing line makes the exit status non-zero.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/load {tmp_path / 'chat'}\nand now?\n"))
    assert (
        main(["chat", "--model", model_dir, "--out-dir", str(tmp_path / "imgs2"), "--max-new-tokens", "2"])
        == 0
    )
    assert "loaded 4 turns" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("/image nowhere.png\nhello\n"))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "2"]) == 1
    out = capsys.readouterr().out
    assert "error: /image" in out and "nowhere.png" in out and "assistant:" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "--model", "{m}", "--image", "{t}/missing.png", "hi"], "missing.png"),
        (["ask", "--model", "{m}", "  "], "empty question"),
        (["generate", "--model", "{m}", "", "-o", "{t}/o.png"], "empty prompt"),
        (["ask", "--model", "{t}", "hi"], "is not a model directory"),
        (["ask", "--model", "{t}/nowhere", "hi"], "model directory not found"),
        (["ask", "--model", "{m}", "hi", "--max-new-tokens", "100000"], "context too long"),
        (["generate", "--model", "{m}", "x", "-o", "{t}/o.unknownext"], "unknown image file extension"),
        (["edit", "--model", "{m}", "--image", "{t}/notimage.png", "x", "-o", "{t}/o.png"], "notimage.png"),
    ],
)
def test_bad_inputs_give_one_line_errors(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "notimage.png").write_text("not a png")
    argv = [a.format(m=model_dir, t=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(Exception, match=re.escape(message)):
        main(["--debug", *argv])


def test_reply_from_ignores_a_vision_end_sampled_as_text(micro):
    """A weak model may put mass on <|vision_end|> as text (the engine now never samples it, below; a
    reply built from other tokens may still hold one): a stray special token, not the end of an image
    (it crashed the evaluation once)."""
    from orion_mllm.inference.engine import Generated
    from orion_mllm.inference.pipeline import OrionPipeline

    pipe = OrionPipeline(micro)
    eng = pipe.engine
    hello = eng.tokenizer.encode("hi")
    stray = Generated(token_ids=[*hello, eng.vision_end_id, *hello, next(iter(eng.stop_ids))])
    reply = pipe.reply_from(stray)
    assert reply.images == [] and reply.text == "hihi"
    tokens = torch.randn(eng.image_tokens, micro.hidden_size)
    real = Generated(
        token_ids=[*hello, eng.vision_end_id, eng.vision_start_id, *[eng.image_pad_id] * eng.image_tokens,
                   eng.vision_end_id, *hello],
        images=[tokens],
    )  # fmt: skip
    reply = pipe.reply_from(real)
    assert len(reply.images) == 1 and reply.images[0].tokens is tokens
    assert [type(p).__name__ for p in reply.parts] == ["str", "GeneratedImage", "str"]


def test_teacher_forced_tokens_start_where_free_running_starts(micro):
    """eval.model_eval.teacher_forced_tokens (the diagnostics' teacher-forced pass): one prediction per
    generated-image position, records in order; the first one of each image depends on the request
    alone, so it equals the engine's first free-running token for that request."""
    from orion_mllm.eval.model_eval import teacher_forced_tokens

    pipe = OrionPipeline(micro)
    requests = ["Draw a red circle.", "Two blue squares, please."]
    records = [
        {
            "conversations": [{"from": "human", "value": r}, {"from": "gpt", "value": "<image>"}],
            "image": _image(k, (48, 48)),
        }
        for k, r in enumerate(requests)
    ]
    pred, enc = teacher_forced_tokens(pipe, records)
    n = pipe.engine.image_tokens
    assert pred.shape == (2 * n, micro.hidden_size) and [e.visual_tokens.shape[0] for e in enc] == [n, n]
    with torch.no_grad():
        free = pipe.engine.generate(
            pipe.image_prompts(requests), SamplingConfig(max_new_tokens=1, allow_images=False)
        )
    for k, out in enumerate(free):
        torch.testing.assert_close(pred[k * n], out.images[0][0].float(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pred[0], pred[n])  # the two requests differ


def test_text_sampling_never_writes_the_tokens_the_engine_writes(micro):
    """<|vision_end|> and <|image_pad|> are written by the engine around and inside an image; sampled as
    text they would end a reply before it starts (a long-trained tiny model's habit after its own
    drawing). Even when the model ranks them first, text decoding picks another token."""
    pipe = OrionPipeline(micro)
    eng = Engine(micro)
    real_head = eng.lm_head

    def favouring_structure(hidden):
        logits = real_head(hidden).clone()
        logits[..., eng.vision_end_id] = 1e4
        logits[..., eng.image_pad_id] = 1e4 - 1
        return logits

    eng.lm_head = favouring_structure
    prompt = pipe.prompt(_session("Hi"))
    for cfg in (SamplingConfig(max_new_tokens=4), SamplingConfig(max_new_tokens=4, temperature=1.0)):
        out = eng.generate([prompt], cfg)[0]
        assert out.token_ids and not {eng.vision_end_id, eng.image_pad_id} & set(out.token_ids)
