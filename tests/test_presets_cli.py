"""Presets, the local tokenizer, and the ``orion`` command line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from orion_mllm.cli import main
from orion_mllm.config import PRESETS, get_preset
from orion_mllm.model.backbone import build_qwen_config, resolve_attn_implementation
from orion_mllm.model.tokenizer import SPECIAL_TOKENS, build_tokenizer


@pytest.mark.parametrize(
    ("name", "expected", "vocab"), [("qwen2.5-vl-3b", 3.75e9, 151936), ("qwen2.5-vl-7b", 8.29e9, 152064)]
)
def test_real_presets_have_the_released_sizes(name, expected, vocab):
    """Built on the meta device (no memory): parameter counts match the released checkpoints."""
    preset = get_preset(name)
    config = build_qwen_config(preset, build_tokenizer(preset.tokenizer_vocab_size))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.005, n
    assert config.text_config.vocab_size == vocab
    assert preset.gen_num_tokens == 81
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_small_presets_validate_and_unknown_names_fail():
    for preset in PRESETS.values():
        preset.validate()
    with pytest.raises(ValueError, match="unknown preset 'huge'; known presets: micro, tiny"):
        get_preset("huge")


def test_tokenizer_carries_qwen_special_tokens_and_template(tmp_path):
    tok = build_tokenizer(640)
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Draw 3 red circles, please! ünïcödé 😀 <|vision_start|><|image_pad|><|vision_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text
    # Special tokens are single ids, never split by BPE.
    assert tok("<|image_pad|><|image_pad|>")["input_ids"] == [tok.convert_tokens_to_ids("<|image_pad|>")] * 2
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template
    # Deterministic build.
    assert build_tokenizer(640).get_vocab() == tok.get_vocab()


def test_attention_implementation_choice():
    assert resolve_attn_implementation("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_attn_implementation("magic")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash"):
            resolve_attn_implementation("flash_attention_2")


def test_cli_demo_build_info(tmp_path, capsys):
    assert main(["demo", "--preset", "micro", "--steps", "30", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["reload_identical"] is True
    assert summary["loss_after"]["mse"] < summary["loss_before"]["mse"]
    assert summary["loss_after"]["ce"] < summary["loss_before"]["ce"]

    assert main(["build", "--preset", "micro", "--head", "qformer", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["orion_config"]["head"]["name"] == "qformer"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orion info: error: ") and "not an ORION model directory" in err
    assert "\n" not in err
    assert main(["build", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --preset" in capsys.readouterr().err


def test_cli_failed_torchrun_launch_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """``orion train --nproc N`` hands the launch to ``train/launch.py``; a failed rank is reported by
    the one error policy (one line, exit 2), like any other error."""
    import orion_mllm.train.launch as launch
    from train_utils import RECIPES

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "launch_local", lambda *a, **kw: calls.append((a, kw)) or 3)
    recipe = str(RECIPES / "stage0_base.yaml")
    assert main(["train", recipe, "--nproc", "2", "--output", str(tmp_path / "r"), "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "orion train: error: a training process failed (exit 3); see rank 0's message above"
    (_, recipe_file, output, overrides), kw = calls[0]
    assert (recipe_file, output, overrides, kw) == (recipe, str(tmp_path / "r"), ["max_steps=1"], {
        "nproc": 2, "debug": False})  # fmt: skip


def test_real_scale_image_grids():
    """252 px generation targets -> 18x18 patches -> 81 tokens; inputs keep aspect, long side <= 1008."""
    from PIL import Image

    from orion_mllm.data.records import encode_record
    from orion_mllm.model.backbone import build_processor
    from orion_mllm.sequence import SequenceBuilder

    preset = get_preset("qwen2.5-vl-7b")
    builder = SequenceBuilder(build_processor(preset), preset.image_spec)
    photo = Image.new("RGB", (1000, 500), (10, 20, 30))
    enc = encode_record(
        builder,
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": photo}, {"type": "text", "text": "Redraw it."}],
            },
            {"role": "assistant", "content": [{"type": "image", "image": photo}]},
        ],
    )
    assert enc.image_grid_thw.tolist() == [[1, 36, 72], [1, 18, 18]]  # (t, h, w) in 14-px patches
    assert enc.image_num_tokens.tolist() == [36 * 72 // 4, 81]
    assert enc.visual_positions.numel() == 81
    tiny = Image.new("RGB", (20, 10))
    enc = encode_record(builder, [{"role": "user", "content": [{"type": "image", "image": tiny}]}])
    assert enc.image_grid_thw.tolist() == [[1, 2, 4]]  # long side raised to 56, short side one 28-px block
