"""Understanding parity with plain transformers, and checkpoint round trips.

The reference path is transformers alone: ``Qwen2_5_VLForConditionalGeneration.from_pretrained``
plus the Qwen2.5-VL processor (the stock ``Qwen2_5_VLProcessor`` when torchvision is installed;
without it, the same class minus its video processor, assembled from ``AutoTokenizer`` and
``AutoImageProcessor``), which computes pixel values, placeholder expansion and M-RoPE positions
by itself. Our path is ``SequenceBuilder`` + ``OrionModel``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from orion_mllm.data.records import encode_record
from orion_mllm.images import resize_for_understanding
from orion_mllm.model.backbone import ImageQwen2_5_VLProcessor
from orion_mllm.model.orion import OrionModel
from orion_mllm.sequence import attach_visual_tokens, collate


def plain_transformers(path: str):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor

        return model, AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, ImageQwen2_5_VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=tokenizer,
        chat_template=(Path(path) / "chat_template.jinja").read_text(),
    )


def two_image_conversation(images):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["wide"]},
                {"type": "text", "text": "and"},
                {"type": "image", "image": images["green_triangle"]},
                {"type": "text", "text": "What differs between the two pictures?"},
            ],
        }
    ]


def test_understanding_logits_match_plain_transformers(micro_dir, images):
    conv = two_image_conversation(images)
    ref_model, processor = plain_transformers(micro_dir)
    spec = OrionModel.from_pretrained(micro_dir).config.image_spec
    pil = [resize_for_understanding(images[k], spec) for k in ("wide", "green_triangle")]
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=pil, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**inputs).logits[0]

    ours_model = OrionModel.from_pretrained(micro_dir).eval()
    enc = encode_record(ours_model.sequence_builder(), conv, add_generation_prompt=True)
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values, inputs["pixel_values"])
    ours = ours_model.logits(collate([enc], processor.tokenizer.pad_token_id))[0]
    assert ours.shape == ref.shape
    assert ref.abs().max().item() > 1e-3  # a real signal, not all zeros
    assert (ours - ref).abs().max().item() <= 1e-5


def test_batched_equals_one_at_a_time(micro_model, images):
    builder = micro_model.sequence_builder()
    convs = [
        two_image_conversation(images),
        [
            {"role": "user", "content": "Draw a blue square."},
            {"role": "assistant", "content": [{"type": "image", "image": images["blue_square"]}]},
        ],
    ]
    encs = [attach_visual_tokens(encode_record(builder, c), micro_model.encode_images) for c in convs]
    pad = builder.tokenizer.pad_token_id
    batched = micro_model.logits(collate(encs, pad))
    for row, enc in enumerate(encs):
        single = micro_model.logits(collate([enc], pad))[0]
        assert (batched[row, : len(enc)] - single).abs().max().item() <= 1e-5


def test_save_load_round_trip_is_exact(micro_model, micro_dir, images):
    loaded = OrionModel.from_pretrained(micro_dir).eval()
    assert loaded.config.to_dict() == micro_model.config.to_dict()
    builder = loaded.sequence_builder()
    enc = encode_record(builder, two_image_conversation(images), add_generation_prompt=True)
    batch = collate([enc], builder.tokenizer.pad_token_id)
    assert torch.equal(loaded.logits(batch), micro_model.logits(batch))
    hidden = torch.randn(5, micro_model.hidden_size)
    assert torch.equal(loaded.predict_visual_tokens(hidden), micro_model.predict_visual_tokens(hidden))
    files = {p.name for p in Path(micro_dir).iterdir()}
    assert {"config.json", "model.safetensors", "vision_head.safetensors", "orion_config.json"} <= files
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only


@pytest.mark.parametrize("head", ["linear", "qformer", "layer_mix"])
def test_every_head_round_trips(tmp_path, head):
    model = OrionModel.from_preset("micro", head=head, seed=3).eval()
    model.save_pretrained(tmp_path / head)
    loaded = OrionModel.from_pretrained(tmp_path / head).eval()
    assert loaded.vision_head.name == head
    x = torch.randn(model.config.head.num_hidden_states or 1, 4, model.hidden_size)
    x = x if head == "layer_mix" else x[0]
    assert torch.equal(loaded.predict_visual_tokens(x), model.predict_visual_tokens(x))


def test_exported_backbone_loads_in_plain_transformers(micro_dir):
    model, processor = plain_transformers(micro_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.endswith("<|im_start|>assistant\n")
    out = model.generate(**processor(text=[text], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 0
    config = json.loads((Path(micro_dir) / "preprocessor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"


def test_interrupted_save_keeps_the_last_good_checkpoint(micro_model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    micro_model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import orion_mllm.model.orion as orion_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(orion_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        micro_model.save_pretrained(target)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    OrionModel.from_pretrained(target)  # still loads


def test_loading_errors_name_the_problem(tmp_path, micro_dir):
    with pytest.raises(FileNotFoundError, match="not an ORION model directory"):
        OrionModel.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "orion_config.json").write_text(
        '{"head": {"name": "mlp", "hidden_size": 64}, "image_spec": {}, "colour": 1}'
    )
    with pytest.raises(ValueError, match=r"orion_config.json: unknown keys \['colour'\]"):
        OrionModel.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        OrionModel.from_qwen(tmp_path / "nowhere")


def test_from_qwen_wraps_a_plain_directory(micro_dir):
    model = OrionModel.from_qwen(micro_dir, head="linear")
    assert model.config.base_model == micro_dir
    assert model.config.image_spec.gen_image_size == 9 * 16  # 9x9 merged grid at patch 8 x merge 2
    assert not any(p.requires_grad for p in model.backbone.model.visual.parameters())


def test_hub_style_chat_template_json_is_read(micro_dir, tmp_path):
    """Qwen2.5-VL checkpoints on the Hub ship the template as chat_template.json; load that layout too."""
    import shutil

    from orion_mllm.model.backbone import load_processor

    hub = tmp_path / "hub"
    shutil.copytree(micro_dir, hub)
    template = (hub / "chat_template.jinja").read_text()
    (hub / "chat_template.jinja").unlink()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    config = json.loads((hub / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (hub / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_processor(hub).chat_template == template
    (hub / "chat_template.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"chat_template\.json: expected a JSON object"):
        load_processor(hub)


def test_save_refuses_to_overwrite_a_foreign_directory(micro_model, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an ORION model; refusing to overwrite"):
        micro_model.save_pretrained(project)
    assert (project / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    micro_model.save_pretrained(tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "orion_config.json").is_file()


def test_load_recovers_from_a_save_killed_between_renames(micro_model, tmp_path):
    target = tmp_path / "ckpt"
    micro_model.save_pretrained(target)
    # What a kill after `path -> .old` and before `.tmp -> path` leaves behind.
    target.rename(tmp_path / ".ckpt.old-12345")
    (tmp_path / ".ckpt.tmp-12345").mkdir()
    with pytest.warns(UserWarning, match="restored .*ckpt from .ckpt.old-12345"):
        loaded = OrionModel.from_pretrained(target)
    assert loaded.config.to_dict() == micro_model.config.to_dict()
    micro_model.save_pretrained(target)  # the next save clears the stale temp dir
    assert not (tmp_path / ".ckpt.tmp-12345").exists()
