"""Token-space classifier-free guidance: caption dropout in training, the guided engine at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from orion_mllm.data.conditioning import drop_prompt, dropout_rng
from orion_mllm.data.records import encode_record
from orion_mllm.inference.engine import Engine, SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.model.orion import OrionModel

ONE = SamplingConfig(max_new_tokens=1, allow_images=False)


@pytest.fixture(scope="module")
def pipe() -> OrionPipeline:
    return OrionPipeline(OrionModel.from_preset("micro", seed=5).eval())


def _image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _tokens(pipe, prompts):
    with torch.no_grad():
        return [o.images[0] for o in pipe.engine.generate(prompts, ONE)]


def test_unconditional_training_record_encodes_like_the_inference_prompt(pipe):
    target, source = _image(1), _image(2)
    gen = {"conversations": [{"from": "human", "value": "Draw a red circle."},
                             {"from": "gpt", "value": "<image>"}], "image": target}  # fmt: skip
    edit = {"conversations": [{"from": "human", "value": "<image>\nMake it blue."},
                              {"from": "gpt", "value": "<image>"}], "images": [source, target]}  # fmt: skip
    builder = pipe.builder
    for record, sources in ((gen, None), (edit, [source])):
        dropped = encode_record(builder, drop_prompt(record))
        prompt = pipe.image_prompts(["anything"], sources=sources, guidance=3.0)[0].uncond
        n = prompt.input_ids.numel()  # ends with the opened <|vision_start|>
        assert torch.equal(dropped.input_ids[:n], prompt.input_ids)
        assert torch.equal(dropped.position_ids[1:, :n], prompt.position_ids)
        # The unconditional branch sees none of the request: any two requests give the same twin,
        # the conditional prompt is that twin with the request's tokens inserted.
        other = pipe.image_prompts(["two green stars above a square"], sources=sources, guidance=3.0)[0]
        assert torch.equal(other.uncond.input_ids, prompt.input_ids)
        assert other.input_ids.numel() > n
        # The labels and targets of the image are unchanged: only the request went.
        full = encode_record(builder, record)
        assert dropped.visual_positions.shape == full.visual_positions.shape
    und = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                             {"from": "gpt", "value": "Red."}], "image": source}  # fmt: skip
    assert drop_prompt(und) is None  # understanding data is never changed


def test_dropout_coin_is_a_function_of_seed_and_slot():
    draws = [dropout_rng(0, s).random() for s in range(2000)]
    assert draws == [dropout_rng(0, s).random() for s in range(2000)]
    assert 0.08 < np.mean(np.array(draws) < 0.1) < 0.12
    assert draws != [dropout_rng(1, s).random() for s in range(2000)]


def test_guidance_one_is_the_unguided_engine_exactly(pipe):
    plain = _tokens(pipe, pipe.image_prompts(["a red circle", "two squares"]))
    # w = 1 given explicitly through a prompt that carries its twin: still no second branch.
    base = pipe.image_prompts(["a red circle", "two squares"])
    uncond = pipe.image_prompts(["", ""])
    guided = [Engine.guided(p, u, 1.0) for p, u in zip(base, uncond, strict=True)]
    for a, b in zip(plain, _tokens(pipe, guided), strict=True):
        assert torch.equal(a, b)


def test_guidance_zero_is_the_unconditional_prediction(pipe):
    uncond_alone = _tokens(pipe, [pipe.image_prompts(["x"], guidance=2.0)[0].uncond])[0]
    zero = _tokens(pipe, pipe.image_prompts(["a red circle"], guidance=0.0))[0]
    torch.testing.assert_close(zero, uncond_alone, rtol=1e-4, atol=1e-5)


def test_guidance_extrapolates_the_first_token_and_batches_like_one_at_a_time(pipe):
    reqs = ["a red circle", "two blue squares left of a star", "a green diamond"]
    w = 3.0
    batched = _tokens(pipe, pipe.image_prompts(reqs, guidance=w))
    single = [_tokens(pipe, pipe.image_prompts([r], guidance=w))[0] for r in reqs]
    for a, b in zip(batched, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The first token has no fed-back history: it is exactly v_u + w (v_c - v_u).
    v_c = _tokens(pipe, pipe.image_prompts(reqs[:1]))[0][0]
    v_u = _tokens(pipe, [pipe.image_prompts(["x"], guidance=2.0)[0].uncond])[0][0]
    torch.testing.assert_close(batched[0][0], v_u + w * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], _tokens(pipe, pipe.image_prompts(reqs[:1]))[0])


def test_guidance_needs_an_opened_image(pipe):
    from orion_mllm.inference.session import ChatSession

    s = ChatSession()
    s.add("user", ["hello"])
    closed = pipe.prompt(s)
    with pytest.raises(ValueError, match="open an image"):
        Engine.guided(closed, closed, 2.0)
    opened = pipe.image_prompts(["x"])[0]
    with pytest.raises(ValueError, match="guidance=-1"):
        Engine.guided(opened, opened, -1.0)


def test_step_loader_drops_requests_of_image_targets_only_and_reproducibly(tmp_path, pipe):
    import json

    from orion_mllm.data.mixture import MixtureSampler
    from orion_mllm.data.sources import open_dataset
    from orion_mllm.train.batches import StepLoader
    from orion_mllm.train.recipe import DatasetEntry

    _image(3).save(tmp_path / "a.png")
    gen = {"conversations": [{"from": "human", "value": "Draw a red circle."},
                             {"from": "gpt", "value": "<image>"}], "image": "a.png"}  # fmt: skip
    und = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                             {"from": "gpt", "value": "Red."}], "image": "a.png"}  # fmt: skip
    (tmp_path / "g.jsonl").write_text(json.dumps(gen) + "\n")
    (tmp_path / "u.jsonl").write_text(json.dumps(und) + "\n")
    sources = [
        open_dataset(DatasetEntry(name="g", path="g.jsonl", task="generation", weight=1), tmp_path),
        open_dataset(DatasetEntry(name="u", path="u.jsonl", task="understanding", weight=1), tmp_path),
    ]

    def loader(p: float, rank: int = 0, world: int = 1) -> StepLoader:
        return StepLoader(
            sources, MixtureSampler([1, 1], [1.0, 1.0], seed=0), pipe.builder, global_batch_size=8,
            rank=rank, world_size=world, packing=False, pack_tokens=512, micro_batch_size=1, pad_token_id=0,
            prompt_dropout=p, seed=0,
        )  # fmt: skip

    full_gen, full_und = (len(loader(0.0).encode(d, 0)) for d in (0, 1))
    dropped = [len(loader(0.5).encode(0, 0, slot=s)) for s in range(200)]
    assert set(dropped) == {full_gen, min(dropped)} and min(dropped) < full_gen
    assert 70 < sum(n < full_gen for n in dropped) < 130
    assert {len(loader(1.0).encode(1, 0, slot=s)) for s in range(20)} == {full_und}  # never changed

    # Two processes drop the same samples as one: the coin is keyed by the global mixture position.
    def lengths(rank: int, world: int) -> list[int]:
        steps = [loader(0.5, rank, world).load(step) for step in range(4)]
        return [b.num_real_tokens for data in steps for b in data.micro_batches]

    one = lengths(0, 1)
    assert sorted(one) == sorted(lengths(0, 2) + lengths(1, 2))
    assert len(set(one)) >= 2  # the steps hold kept and dropped samples, so the check has teeth


def test_eval_shapes_gen_refuses_a_negative_guidance(tmp_path, capsys):
    from orion_mllm.cli import main

    argv = ["eval", "shapes-gen", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--guidance", "-1"]
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance -1.0: must be >= 0" in err[0]
