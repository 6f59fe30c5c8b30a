"""The ORION training forward: which terms are computed, where gradients go, and that it learns."""

from __future__ import annotations

import time

import pytest
import torch

from orion_mllm.data.records import encode_record
from orion_mllm.demo import demo_conversations, draw_shape, evaluate, make_batches, train_steps
from orion_mllm.kernels.reference import naive_kl_reference
from orion_mllm.losses import LossWeights, step_loss
from orion_mllm.model.orion import OrionModel
from orion_mllm.model.teacher import KLTeacher, frozen_copy, make_teacher
from orion_mllm.sequence import IGNORE_INDEX


@pytest.fixture
def fresh_micro() -> OrionModel:
    return OrionModel.from_preset("micro", seed=1)


def _naive_hidden(model: OrionModel, batch) -> torch.Tensor:
    """The LLM's last hidden states computed the plain way (visual tokens scattered into the embeddings)."""
    return model.backbone.model.language_model(
        inputs_embeds=model.backbone.model.language_model.embed_tokens(batch.input_ids).masked_scatter(
            (batch.input_ids == model.backbone.config.image_token_id)[..., None], batch.visual_tokens
        ),
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).last_hidden_state


def test_forward_terms_match_direct_computation(fresh_micro):
    model = fresh_micro.eval()
    teacher = make_teacher(model)
    batch = make_batches(model, demo_conversations(3), batch_size=4)[0]
    weights = LossWeights(1.0, 1.0, 0.01)
    out = model(batch, weights, teacher=teacher)
    # Recompute each term from full logits / head outputs, the naive way.
    hidden = _naive_hidden(model, batch)
    logits = model.backbone.lm_head(hidden)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    rows, cols = batch.visual_positions.T
    mse = ((model.vision_head(hidden[rows, cols]) - batch.visual_targets) ** 2).mean()
    assert out.terms.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.terms.mse.item() == pytest.approx(mse.item(), rel=1e-5)
    # Teacher is an exact copy at this point: KL is zero.
    assert abs(out.terms.kl.item()) < 1e-7
    assert step_loss(out.terms, weights).loss.item() == pytest.approx(ce.item() + mse.item(), rel=1e-5)
    assert out.num_visual_targets == rows.numel() > 0
    assert out.num_text_targets == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def test_square_ce_weighting_weighs_each_answer_by_its_length(fresh_micro):
    """ce_weighting="square": the CE is the mean of per-token CE weighted 1/sqrt(answer length),
    from full logits; "token" stays the plain mean."""
    model = fresh_micro.eval()
    batch = make_batches(model, demo_conversations(3), batch_size=4)[0]
    weights = LossWeights(1.0, 0.0, 0.0)
    with torch.no_grad():
        square = model(batch, weights, ce_weighting="square").terms.ce
        token = model(batch, weights, ce_weighting="token").terms.ce
        logits = model.backbone.lm_head(_naive_hidden(model, batch))[:, :-1]
    labels = batch.labels[:, 1:]
    valid = labels != IGNORE_INDEX
    per_token = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="none")
    # Answer lengths by hand: runs of consecutive labelled positions, row by row.
    lengths = []
    for row in valid.tolist():
        run = 0
        for v in [*row, False]:
            if v:
                run += 1
            elif run:
                lengths += [run] * run
                run = 0
    w = torch.tensor(lengths, dtype=torch.float32).rsqrt()
    assert len(set(lengths)) > 1  # answers of different lengths, or the test would not tell
    assert square.item() == pytest.approx(((w * per_token).sum() / w.sum()).item(), rel=1e-5)
    assert token.item() == pytest.approx(per_token.mean().item(), rel=1e-5)


def test_kl_after_drift_matches_reference_and_reaches_only_student(fresh_micro):
    model = fresh_micro
    teacher = make_teacher(model)
    with torch.no_grad():  # move the student away from its teacher
        for p in model.backbone.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batches(model, demo_conversations(2), batch_size=4)[0]
    weights = LossWeights(0.0, 0.0, 1.0)
    out = model(batch, weights, teacher=teacher)
    assert out.terms.ce is None and out.terms.mse is None
    assert out.terms.kl.item() > 1e-6
    step_loss(out.terms, weights).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert model.backbone.lm_head.weight.grad is not None
    # Teacher is independent: changing the student did not change it.
    s = dict(model.backbone.named_parameters())
    t = dict(teacher.backbone.named_parameters())
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(s[name], t[name])
    # Value agrees with the fp64 naive reference on the gathered positions.
    from orion_mllm.model.orion import backbone_hidden_states

    with torch.no_grad():
        hs, _ = backbone_hidden_states(model.backbone, batch, batch.visual_tokens)
        ht = teacher(batch, batch.visual_tokens)
    rows, cols = batch.visual_positions.T
    ref = naive_kl_reference(hs[rows, cols], model.lm_head_weight, ht[rows, cols], teacher.lm_head_weight)
    assert out.terms.kl.item() == pytest.approx(ref.item(), rel=1e-4)


def test_warmup_stage_trains_head_only(fresh_micro):
    model = fresh_micro
    model.backbone.requires_grad_(False)
    batch = make_batches(model, demo_conversations(2), batch_size=4)[0]
    weights = LossWeights(0.0, 1.0, 0.0)
    out = model(batch, weights)
    assert out.terms.ce is None and out.terms.kl is None
    step_loss(out.terms, weights).loss.backward()
    assert all(p.grad is not None for p in model.vision_head.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


def test_kl_weight_without_teacher_is_an_error(fresh_micro):
    batch = make_batches(fresh_micro, demo_conversations(1), batch_size=2)[0]
    with pytest.raises(ValueError, match="needs a teacher"):
        fresh_micro(batch, LossWeights(1.0, 1.0, 0.01))


def test_kl_teacher_must_be_a_kl_teacher(fresh_micro):
    """One kind of teacher object: a bare backbone or a whole OrionModel is refused by name."""
    batch = make_batches(fresh_micro, demo_conversations(1), batch_size=2)[0]
    weights = LossWeights(1.0, 1.0, 0.01)
    for wrong in (frozen_copy(fresh_micro.backbone), fresh_micro):
        with pytest.raises(TypeError, match="must be a KLTeacher"):
            fresh_micro(batch, weights, teacher=wrong)
    wrapped = KLTeacher(frozen_copy(fresh_micro.backbone))
    assert fresh_micro(batch, weights, teacher=wrapped).terms.kl is not None


def test_vision_tower_is_frozen(fresh_micro):
    assert not any(p.requires_grad for p in fresh_micro.backbone.model.visual.parameters())
    batch = make_batches(fresh_micro, demo_conversations(2), batch_size=4)[0]
    batch.visual_tokens = None  # force the forward to run the tower itself
    weights = LossWeights(1.0, 1.0, 0.0)
    step_loss(fresh_micro(batch, weights).terms, weights).loss.backward()
    assert all(p.grad is None for p in fresh_micro.backbone.model.visual.parameters())


@pytest.mark.parametrize("head", ["linear", "qformer", "layer_mix"])
def test_each_head_trains_through_the_model(head):
    model = OrionModel.from_preset("micro", head=head, seed=2)
    batch = make_batches(model, demo_conversations(2), batch_size=4)[0]
    weights = LossWeights(1.0, 1.0, 0.0)
    step_loss(model(batch, weights).terms, weights).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.vision_head.parameters())


def test_learning_check_micro_regresses_visual_tokens_and_learns_text():
    """A micro model fed a few fixed captions learns their images' visual tokens and a text answer."""
    start = time.time()
    torch.manual_seed(0)
    model = OrionModel.from_preset("micro", seed=0)
    captions = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    convs = [
        [
            {"role": "user", "content": f"Draw a {c} {s}."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"A {c} {s}:"},
                    {"type": "image", "image": draw_shape(c, s)},
                ],
            },
        ]
        for c, s in captions
    ]
    batches = make_batches(model, convs, batch_size=4)
    weights = LossWeights(1.0, 1.0, 0.0)
    before = evaluate(model, batches, weights)
    train_steps(model, batches, weights, steps=150, lr=2e-3, progress=False)
    after = evaluate(model, batches, weights)
    elapsed = time.time() - start
    assert before["mse"] / after["mse"] >= 10, (before, after)
    assert after["ce"] < 0.5 * before["ce"], (before, after)
    print(f"learning check: {before} -> {after} in {elapsed:.1f}s")


def test_text_only_batch_with_mse_weight(fresh_micro):
    convs = [[{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello there."}]]
    batch = make_batches(fresh_micro, convs, batch_size=1)[0]
    assert batch.visual_tokens is None
    teacher = make_teacher(fresh_micro)
    weights = LossWeights(1.0, 1.0, 0.01)
    out = fresh_micro(batch, weights, teacher=teacher)
    assert out.terms.mse.item() == 0.0 and out.terms.kl.item() == 0.0
    step_loss(out.terms, weights).loss.backward()
    assert fresh_micro.backbone.lm_head.weight.grad is not None


def test_visual_token_count_mismatch_is_an_error(fresh_micro):
    batch = make_batches(fresh_micro, demo_conversations(1), batch_size=2)[0]
    batch.visual_tokens = batch.visual_tokens[:-1]
    with pytest.raises(ValueError, match="<\\|image_pad\\|> tokens but"):
        fresh_micro.logits(batch)


def test_demo_data_covers_generation_understanding_and_editing():
    def has_image(content) -> bool:
        return isinstance(content, list) and any(part["type"] == "image" for part in content)

    found = {
        (has_image(user["content"]), has_image(reply["content"])) for user, reply in demo_conversations()
    }
    assert {(False, True), (True, False), (True, True)} <= found  # text-to-image, understanding, editing


def test_standardize_visual_tokens_is_an_affine_rescaling_of_the_random_tower(fresh_micro, images):
    """Mean 0 / std `scale` per dimension on the calibration images, and the same information:
    the new tokens are the old ones mapped per dimension by an affine function."""
    builder = fresh_micro.sequence_builder()
    samples = []
    for name, image in images.items():
        enc = encode_record(
            builder,
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": name}],
                }
            ],
        )
        samples.append((enc.pixel_values, enc.image_grid_thw))
    before = torch.cat([fresh_micro.encode_images(px, g) for px, g in samples])
    fresh_micro.standardize_visual_tokens(samples, scale=0.5)
    after = torch.cat([fresh_micro.encode_images(px, g) for px, g in samples])
    assert after.mean(0).abs().max() < 1e-4
    assert torch.allclose(after.std(0), torch.full_like(after.std(0), 0.5), atol=1e-3)
    k = after.std(0) / before.std(0)  # the per-dimension affine map, checked on every token
    assert torch.allclose(after, (before - before.mean(0)) * k, atol=2e-3)
    assert before.std(0).mean() < 0.05  # the random tower's spread really was tiny


def test_standardize_tokens_only_in_stage_base_from_a_preset():
    from orion_mllm.train.recipe import RecipeError, load_recipe
    from train_utils import RECIPES

    load_recipe(RECIPES / "stage0_base.yaml", ["model.standardize_tokens_images=8"])
    with pytest.raises(RecipeError, match="stage base from a preset only"):
        load_recipe(RECIPES / "stage2_pretrain.yaml", ["model.standardize_tokens_images=8"])


def test_visual_input_noise_perturbs_generated_inputs_only_never_targets(fresh_micro):
    """The noisy pass equals a pass whose generated-image input tokens carry that exact noise, with
    the clean tokens as MSE targets; user (understanding) images are left alone."""
    from orion_mllm.model.orion import backbone_hidden_states

    model = fresh_micro.eval()
    batch = make_batches(model, demo_conversations(3), batch_size=6)[0]
    tokens = batch.visual_tokens
    gen_rows = batch.visual_target_index.unique()
    assert 0 < len(gen_rows) < tokens.shape[0]  # the batch mixes generated and user images
    torch.manual_seed(7)
    out = model(batch, LossWeights(1.0, 1.0, 0.0), visual_input_noise=0.3)
    torch.manual_seed(7)
    noise = torch.zeros_like(tokens)
    noise[gen_rows] = torch.randn(len(gen_rows), tokens.shape[1]) * 0.3
    hidden, _ = backbone_hidden_states(model.backbone, batch, tokens + noise)
    rows, cols = batch.visual_positions.T
    mse = ((model.vision_head(hidden[rows, cols]) - tokens[batch.visual_target_index]) ** 2).mean()
    assert out.terms.mse.item() == pytest.approx(mse.item(), rel=1e-5)
    clean = model(batch, LossWeights(1.0, 1.0, 0.0))
    assert out.terms.mse.item() != pytest.approx(clean.terms.mse.item(), rel=1e-3)
