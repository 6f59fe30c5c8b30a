"""The edit-source skip (``OrionConfig.source_skip``): which image an edit's source is, that the skip
adds exactly the projected source token at the positions that regress the edited image, that it is
a no-op until trained, and that free-running editing feeds it where teacher forcing does."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from orion_mllm.data.packing import collate_packed
from orion_mllm.data.records import encode_record
from orion_mllm.inference.engine import Engine, SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.losses import LossWeights
from orion_mllm.model.orion import SOURCE_SKIP_WEIGHTS_NAME, OrionModel, backbone_hidden_states
from orion_mllm.sequence import ImagePart, Message, TextPart, attach_visual_tokens, collate, edit_sources


def _image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _edit_record(seed: int, instruction: str = "Make the circle blue.") -> dict:
    return {
        "conversations": [
            {"from": "human", "value": "<image>\n" + instruction},
            {"from": "gpt", "value": "<image>"},
        ],
        "images": [_image(seed), _image(seed + 100)],
    }


@pytest.fixture(scope="module")
def skip_model() -> OrionModel:
    """A micro model with a source skip whose weights are random (not the zero init), so it matters."""
    model = OrionModel.from_preset("micro", seed=5).eval()
    model.enable_source_skip()
    torch.manual_seed(1)
    with torch.no_grad():
        model.source_skip.input.weight.normal_(0, 0.5)
        model.source_skip.output_gate.normal_(0, 0.5)
    return model


IMG = object()  # an image placeholder: edit_sources reads only the turn structure and the grids


def _msg(role: str, *parts) -> Message:
    return Message(role, tuple(ImagePart(p) if p is IMG else TextPart(p) for p in parts))


def test_edit_source_is_the_single_same_grid_image_of_the_user_turn_before():
    g = torch.tensor([[1, 6, 6], [1, 6, 6]])
    edit = [_msg("user", IMG, "Make it red."), _msg("assistant", IMG)]
    assert edit_sources(edit, g) == ([None, 0], None)
    # Text-to-image, two user images, another grid, or a turn in between: no source.
    assert edit_sources([_msg("user", "Draw."), _msg("assistant", IMG)], torch.tensor([[1, 6, 6]])) == (
        [None],
        None,
    )
    two = [_msg("user", IMG, IMG, "Combine."), _msg("assistant", IMG)]
    assert edit_sources(two, torch.tensor([[1, 6, 6]] * 3)) == ([None, None, None], None)
    assert edit_sources(edit, torch.tensor([[1, 4, 6], [1, 6, 6]])) == ([None, None], None)
    later = [
        _msg("user", IMG, "Hi"),
        _msg("assistant", "Hello."),
        _msg("user", "Draw."),
        _msg("assistant", IMG),
    ]
    assert edit_sources(later, g) == ([None, None], None)
    # A prompt ending with the user's image and request: the reply's image would edit it.
    assert edit_sources(
        [_msg("user", IMG, "Make it red.")], torch.tensor([[1, 6, 6]]), add_generation_prompt=True
    ) == (
        [None],
        0,
    )


def test_source_index_points_at_the_same_cell_of_the_source_and_survives_batching(skip_model):
    builder = skip_model.sequence_builder()
    edit = encode_record(builder, _edit_record(0))
    n = int(edit.image_num_tokens[1])
    assert torch.equal(edit.visual_target_index, torch.arange(n, 2 * n))
    assert torch.equal(edit.visual_source_index, torch.arange(n))
    gen = encode_record(
        builder,
        {
            "conversations": [{"from": "human", "value": "Draw."}, {"from": "gpt", "value": "<image>"}],
            "image": _image(3),
        },
    )
    assert gen.visual_source_index is None
    for batch in (collate([gen, edit], 0), collate_packed([[gen, edit]], 0)):
        # gen's n tokens come first, so the edit's source tokens sit at n..2n-1 of the batch's list.
        assert torch.equal(
            batch.visual_source_index, torch.cat([torch.full((n,), -1), torch.arange(n, 2 * n)])
        )
    assert collate([gen], 0).visual_source_index is None


def test_skip_adds_exactly_the_projected_source_token_at_the_regressing_positions(skip_model):
    """Input: W x source_j at the position regressing token j; output: gate * source_j on top of the
    head's prediction; the MSE of the training forward is that prediction's."""
    m = skip_model
    enc = attach_visual_tokens(encode_record(m.sequence_builder(), _edit_record(1)), m.encode_images)
    batch = collate([enc], 0)
    tokens = batch.visual_tokens
    with torch.no_grad():
        sources = m.batch_sources(batch, tokens)
        got, _ = backbone_hidden_states(m.backbone, batch, tokens, source_inputs=m.source_inputs(sources))
        lm = m.backbone.model.language_model
        embeds = lm.embed_tokens(batch.input_ids).clone()
        embeds[batch.input_ids == m.backbone.config.image_token_id] = tokens
        n = int(enc.image_num_tokens[1])
        for j, pos in enumerate(enc.visual_positions.tolist()):  # <|vision_start|>, then v_1..v_{n-1}
            embeds[0, pos] += tokens[j] @ m.source_skip.input.weight.T
        want = lm(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
        pred = m.vision_head(want[rows, cols]) + tokens[:n] * m.source_skip.output_gate
        mse = m(batch, LossWeights(ce=0.0, mse=1.0, kl=0.0)).terms.mse
    assert len(enc.visual_positions) == n and torch.equal(sources, tokens[:n])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.predict_visual_tokens(got[rows, cols], sources), pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mse, ((pred - tokens[n:]) ** 2).mean(), atol=1e-6, rtol=1e-5)
    # The user image itself and every other position are untouched: only the regressing positions moved.
    plain, _ = backbone_hidden_states(m.backbone, batch, tokens)
    first = int(enc.visual_positions[0])
    torch.testing.assert_close(got[0, :first], plain[0, :first])


def test_a_new_skip_turns_edits_into_source_plus_change_and_leaves_the_rest_alone(micro_model):
    """At init the input map is zero and the gate one: an edit's prediction is the old prediction plus
    the source token at that cell; a text-to-image batch computes exactly what it did. Both parts train."""
    model = copy.deepcopy(micro_model)
    builder = model.sequence_builder()
    edit = collate([attach_visual_tokens(encode_record(builder, _edit_record(2)), model.encode_images)], 0)
    gen_record = {"conversations": [{"from": "human", "value": "Draw."}, {"from": "gpt", "value": "<image>"}]}
    gen = collate(
        [
            attach_visual_tokens(
                encode_record(builder, {**gen_record, "image": _image(4)}), model.encode_images
            )
        ],
        0,
    )
    w = LossWeights(ce=1.0, mse=1.0, kl=0.0)

    def predictions(batch):
        sources = model.batch_sources(batch, batch.visual_tokens)
        hidden, _ = backbone_hidden_states(
            model.backbone, batch, batch.visual_tokens, source_inputs=model.source_inputs(sources)
        )
        rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
        return model.predict_visual_tokens(hidden[rows, cols], sources)

    with torch.no_grad():
        before_gen, before_edit, before_terms = model(gen, w).terms, predictions(edit), model(edit, w).terms
    model.enable_source_skip()
    skip = model.source_skip
    assert model.config.source_skip and not skip.input.weight.any() and bool((skip.output_gate == 1).all())
    n = before_edit.shape[0]
    with torch.no_grad():
        after_gen = model(gen, w).terms
        torch.testing.assert_close(predictions(edit), before_edit + edit.visual_tokens[:n])
    assert torch.equal(before_gen.mse, after_gen.mse) and torch.equal(before_gen.ce, after_gen.ce)
    after = model(edit, w).terms
    assert torch.equal(before_terms.ce, after.ce) and not torch.equal(before_terms.mse, after.mse)
    after.mse.backward()
    for p in (skip.input.weight, skip.output_gate):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_save_and_load_keep_the_skip(skip_model, tmp_path):
    path = skip_model.save_pretrained(tmp_path / "m")
    loaded = OrionModel.from_pretrained(path)
    assert loaded.config.source_skip
    for k, v in skip_model.source_skip.state_dict().items():
        assert torch.equal(loaded.source_skip.state_dict()[k], v)
    (path / SOURCE_SKIP_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="source_skip"):
        OrionModel.from_pretrained(path)


def test_free_running_edit_feeds_the_skip_where_teacher_forcing_does(skip_model):
    """The engine's edited tokens, fed back teacher-forced with the same source, give back the same
    regressions: the skip is added at the same positions with the same source cells. Without the
    source image the reply has no source (and the skip changes the output when there is one)."""
    m = skip_model
    pipe = OrionPipeline(m)
    src = _image(7)
    (prompt,) = pipe.image_prompts(["Make it red."], sources=[src])
    assert prompt.source_tokens is not None and prompt.source_tokens.shape[0] == pipe.engine.image_tokens
    cfg = SamplingConfig(max_new_tokens=1, allow_images=False)
    (out,) = pipe.engine.generate([prompt], cfg)
    edited = out.images[0]
    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nMake it red."},
            {"from": "gpt", "value": "<image>"},
        ],
        "images": [src, _image(8)],
    }
    enc = encode_record(m.sequence_builder(), record)
    with torch.no_grad():
        source = m.encode_images(
            enc.pixel_values[: int(enc.image_grid_thw[0].prod())], enc.image_grid_thw[:1]
        )
    enc.visual_tokens = torch.cat([source, edited.to(source.dtype)])
    batch = collate([enc], 0)
    with torch.no_grad():
        sources = m.batch_sources(batch, batch.visual_tokens)
        hidden, _ = backbone_hidden_states(
            m.backbone, batch, batch.visual_tokens, source_inputs=m.source_inputs(sources)
        )
        rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
        regressed = m.predict_visual_tokens(hidden[rows, cols], sources)
    torch.testing.assert_close(regressed, edited, atol=1e-5, rtol=1e-5)
    # The cache-free engine agrees, and without the skip's input the edit comes out different.
    (ref,) = Engine(m, kv_cache=False).generate([prompt], cfg)
    torch.testing.assert_close(ref.images[0], edited, atol=1e-5, rtol=1e-5)
    (blind,) = pipe.engine.generate([dataclasses.replace(prompt, source_tokens=None)], cfg)
    assert not torch.allclose(blind.images[0], edited)
    # A text-to-image prompt has no source.
    assert pipe.image_prompts(["Draw a red circle."])[0].source_tokens is None


def test_recipe_adds_the_skip_and_refuses_to_drop_a_trained_one(skip_model, tmp_path):
    from orion_mllm.train.recipe import load_recipe
    from orion_mllm.train.setup import SetupError, apply_trainable, build_model
    from train_utils import RECIPES

    plain = tmp_path / "plain"
    OrionModel.from_preset("micro", seed=5).save_pretrained(plain)
    recipe = load_recipe(RECIPES / "stage3_sft.yaml", ["model.source_skip=true"])
    model = build_model(recipe, str(plain))
    assert model.source_skip is not None and not model.source_skip.input.weight.any()
    apply_trainable(model, recipe)
    assert all(p.requires_grad for p in model.source_skip.parameters())
    trained = skip_model.save_pretrained(tmp_path / "trained")
    with pytest.raises(SetupError, match="source_skip"):
        build_model(load_recipe(RECIPES / "stage3_sft.yaml"), str(trained))
