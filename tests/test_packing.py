"""Sequence packing: first-fit-decreasing bins, and packed rows that compute exactly what each sample
computes alone (no attention across samples or into padding), on the real micro model in fp32."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orion_mllm.data.packing import collate_packed, pack_first_fit_decreasing
from orion_mllm.data.records import encode_record
from orion_mllm.demo import draw_shape
from orion_mllm.losses import LossWeights, cross_entropy_loss, kl_divergence_loss, mse_loss, step_loss
from orion_mllm.model.orion import OrionModel, backbone_hidden_states
from orion_mllm.model.teacher import make_teacher
from orion_mllm.sequence import (
    IGNORE_INDEX,
    Batch,
    EncodedConversation,
    attach_visual_tokens,
    collate,
)

# ----------------------------------------------------------------------------- first-fit decreasing


def test_ffd_known_example():
    # Sorted: 7(2) 6(5) 5(0) 4(4) 3(1) 2(3) 1(6); each goes into the first bin with room.
    assert pack_first_fit_decreasing([5, 3, 7, 2, 4, 6, 1], 10) == [[2, 1], [5, 4], [0, 3, 6]]
    assert pack_first_fit_decreasing([3, 3, 3], 6) == [[0, 1], [2]]  # ties keep index order
    assert pack_first_fit_decreasing([], 6) == []


def test_ffd_respects_budget_and_places_every_index_once():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (500,), generator=gen).tolist()
    bins = pack_first_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert bins == pack_first_fit_decreasing(lengths, 512)  # deterministic
    # FFD never needs more than 11/9 OPT + 6/9 bins; the volume bound is a lower bound on OPT.
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 512) + 1


def test_ffd_over_budget_names_index_length_and_budget():
    with pytest.raises(ValueError, match=r"sample 1 has length 11 > packing budget 10"):
        pack_first_fit_decreasing([4, 11, 3], 10)


# ----------------------------------------------------------------------------- packed == alone


def _conversations() -> list[list[dict]]:
    """Six kinds: generation, understanding, editing, non-square input, multi-turn, text only."""
    red, blue = draw_shape("red", "circle"), draw_shape("blue", "square", 40)
    green, green_red = draw_shape("green", "triangle", 56), draw_shape("red", "triangle", 56)
    wide = draw_shape("yellow", "circle", 48).resize((96, 40))

    def img(image):
        return {"type": "image", "image": image}

    return [
        [{"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": [img(red)]}],
        [
            {"role": "user", "content": [img(blue), {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A blue square."},
        ],
        [
            {"role": "user", "content": [img(green), {"type": "text", "text": "Make it red."}]},
            {"role": "assistant", "content": [img(green_red)]},
        ],
        [
            {"role": "user", "content": [img(wide), {"type": "text", "text": "Describe the picture."}]},
            {"role": "assistant", "content": "A stretched yellow circle on a white background."},
        ],
        [
            {"role": "user", "content": "Draw a green triangle."},
            {"role": "assistant", "content": [img(green)]},
            {"role": "user", "content": "What colour is it?"},
            {"role": "assistant", "content": "Green."},
        ],
        [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
        ],
    ]


@pytest.fixture(scope="module")
def encoded(micro_model) -> list[EncodedConversation]:
    builder = micro_model.sequence_builder()
    return [
        attach_visual_tokens(encode_record(builder, conv, record_id=f"pack-{i}"), micro_model.encode_images)
        for i, conv in enumerate(_conversations())
    ]


@pytest.fixture(scope="module")
def packed_setup(micro_model, encoded):
    lengths = [len(x) for x in encoded]
    budget = max(lengths) + min(lengths) + 7  # forces 2-3 bins, at least one shared, with padding
    bins = pack_first_fit_decreasing(lengths, budget)
    pad = micro_model.processor.tokenizer.pad_token_id
    batch = collate_packed([[encoded[i] for i in b] for b in bins], pad, budget)
    # Where each sample landed: (row, offset), and its slice of the batch's visual lists.
    where, k = {}, 0
    for row, b in enumerate(bins):
        offset = 0
        for i in b:
            where[i] = (row, offset)
            offset += lengths[i]
    order = [i for b in bins for i in b]
    vis = {}
    for i in order:
        n = len(encoded[i].visual_positions)
        vis[i] = slice(k, k + n)
        k += n
    return bins, budget, batch, where, vis


def test_packed_batch_layout(micro_model, encoded, packed_setup):
    bins, budget, batch, where, vis = packed_setup
    assert 2 <= len(bins) <= 3 and max(len(b) for b in bins) >= 2
    assert batch.packed and batch.input_ids.shape == (len(bins), budget)
    real = sum(len(x) for x in encoded)
    assert batch.num_real_tokens == real
    assert batch.padding_share == pytest.approx(1 - real / (len(bins) * budget))
    assert 0 < batch.padding_share < 1
    image_pad = micro_model.backbone.config.image_token_id
    for i, item in enumerate(encoded):
        row, off = where[i]
        span = slice(off, off + len(item))
        assert torch.equal(batch.input_ids[row, span], item.input_ids)
        assert torch.equal(batch.position_ids[:, row, span], item.position_ids)  # all four rows restart
        assert batch.position_ids[0, row, off] == 0
        assert torch.equal(batch.labels[row, off + 1 : off + len(item)], item.labels[1:])
        assert batch.labels[row, off] == IGNORE_INDEX
        assert torch.equal(batch.visual_targets[vis[i]], _targets(item, micro_model.hidden_size))
        assert (batch.visual_positions[vis[i], 0] == row).all()
        assert torch.equal(batch.visual_positions[vis[i], 1], item.visual_positions + off)
    # Padding: its own segment of restarting text positions, unsupervised, not an image.
    for row, b in enumerate(bins):
        used = sum(len(encoded[i]) for i in b)
        assert torch.equal(batch.position_ids[:, row, used:], torch.arange(budget - used).expand(4, -1))
        assert (batch.labels[row, used:] == IGNORE_INDEX).all()
        assert (batch.mm_token_type_ids[row, used:] == 0).all()
        assert (batch.attention_mask[row, :used] == 1).all() and (batch.attention_mask[row, used:] == 0).all()
    # Visual tokens follow the <|image_pad|> order of the flattened ids (what masked_scatter fills).
    assert int((batch.input_ids == image_pad).sum()) == batch.visual_tokens.shape[0]
    order = [i for b in bins for i in b]
    assert torch.equal(
        batch.visual_tokens,
        torch.cat([encoded[i].visual_tokens for i in order if encoded[i].visual_tokens is not None]),
    )
    moved = batch.to("cpu")
    assert moved.packed and moved.padding_share == batch.padding_share


def test_collate_packed_errors(encoded):
    with pytest.raises(ValueError, match="packing budget"):
        collate_packed([[encoded[0], encoded[1]]], 0, budget=len(encoded[0]))
    with pytest.raises(ValueError, match="no empty bins"):
        collate_packed([[encoded[0]], []], 0)
    with pytest.raises(ValueError, match="visual tokens attached and others not"):
        collate_packed([[encoded[0], replace(encoded[2], visual_tokens=None)]], 0)
    unpadded = collate_packed([[encoded[0]], [encoded[1]]], 0)  # budget None: the longest row
    assert unpadded.input_ids.shape[1] == max(len(encoded[0]), len(encoded[1]))


def _targets(item: EncodedConversation, hidden_size: int) -> torch.Tensor:
    return item.visual_targets if item.visual_tokens is not None else torch.zeros(0, hidden_size)


def _sample_losses(model, teacher, hidden, teacher_hidden, labels, visual_positions, visual_targets):
    """CE / MSE / KL of one sample from its own [n, d] slice of student and teacher hidden states."""
    shifted = labels[1:]  # unshifted labels: the hidden at t predicts labels[t + 1]
    keep = (shifted != IGNORE_INDEX).nonzero().flatten()
    ce = cross_entropy_loss(hidden[keep], model.lm_head_weight, shifted[keep])
    vh = hidden[visual_positions]
    mse = mse_loss(model.vision_head(vh), visual_targets)
    kl = kl_divergence_loss(
        vh, model.lm_head_weight, teacher_hidden[visual_positions], teacher.lm_head_weight
    )
    return ce.item(), mse.item(), kl.item(), int(keep.numel())


@pytest.fixture(scope="module")
def teacher(micro_model):
    """A teacher that differs from the (session) student, so KL is non-zero; the student is untouched."""
    t = make_teacher(micro_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t.backbone.model.language_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return t


@torch.no_grad()
def test_packed_equals_each_sample_alone(micro_model, encoded, packed_setup, teacher):
    model = micro_model
    _, _, batch, where, vis = packed_setup
    pad = model.processor.tokenizer.pad_token_id
    hidden, _ = backbone_hidden_states(model.backbone, batch, batch.visual_tokens)
    t_hidden = teacher(batch, batch.visual_tokens)
    worst, kinds = 0.0, set()
    for i, item in enumerate(encoded):
        row, off = where[i]
        n = len(item)
        alone = collate([item], pad)
        h_alone, _ = backbone_hidden_states(model.backbone, alone, alone.visual_tokens)
        t_alone = teacher(alone, alone.visual_tokens)
        diff = (hidden[row, off : off + n] - h_alone[0]).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-5, f"sample {i}: packed hidden states differ by {diff:.2e}"
        assert (t_hidden[row, off : off + n] - t_alone[0]).abs().max().item() < 1e-5

        # Losses: the packed side goes through the batch's own labels and visual indices.
        rows, cols = batch.visual_positions[vis[i]].T
        assert (rows == row).all()
        span = slice(off, off + n)
        packed_terms = _sample_losses(
            model, teacher, hidden[row, span], t_hidden[row, span], batch.labels[row, span],
            cols - off, batch.visual_targets[vis[i]],
        )  # fmt: skip
        alone_terms = _sample_losses(
            model, teacher, h_alone[0], t_alone[0], item.labels, item.visual_positions,
            _targets(item, model.hidden_size),
        )  # fmt: skip
        for name, x, y in zip(("ce", "mse", "kl", "n_text"), packed_terms, alone_terms, strict=True):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-12), f"sample {i}: {name} {x} vs {y}"
        if len(item.visual_positions):
            kinds.add("visual")
            assert alone_terms[2] > 1e-6  # the perturbed teacher makes KL non-zero
        if alone_terms[3]:
            kinds.add("text")
    assert kinds == {"visual", "text"}
    print(f"packed vs alone: worst hidden-state difference {worst:.2e}")


@torch.no_grad()
def _assert_packed_equals_alone(packed_model, alone_model, encoded, packed_setup, what: str) -> None:
    """Each sample's hidden states in ``packed_model``'s packed rows equal ``alone_model``'s on it alone."""
    _, _, batch, where, _ = packed_setup
    hidden, _ = backbone_hidden_states(packed_model.backbone, batch, batch.visual_tokens)
    for i, item in enumerate(encoded):
        row, off = where[i]
        alone = collate([item], 0)
        h_alone, _ = backbone_hidden_states(alone_model.backbone, alone, alone.visual_tokens)
        diff = (hidden[row, off : off + len(item)] - h_alone[0]).abs().max().item()
        assert diff < 1e-5, f"sample {i}: {what} packed hidden states differ by {diff:.2e}"


def test_packed_equals_alone_with_eager_attention(encoded, packed_setup):
    """transformers builds the block-diagonal mask per backend; check eager as well as sdpa."""
    model = OrionModel.from_preset("micro", seed=0, attn_implementation="eager").eval()
    _assert_packed_equals_alone(model, model, encoded, packed_setup, "eager")


@torch.no_grad()
def test_packed_forward_matches_padded_forward(micro_model, encoded, packed_setup, teacher):
    _, _, packed, _, _ = packed_setup
    padded = collate(encoded, micro_model.processor.tokenizer.pad_token_id)
    weights = LossWeights(1.0, 1.0, 0.01)
    a = micro_model(packed, weights, teacher=teacher)
    b = micro_model(padded, weights, teacher=teacher)
    assert a.num_text_targets == b.num_text_targets > 0
    assert a.num_visual_targets == b.num_visual_targets > 0
    for name in ("ce", "mse", "kl"):
        x, y = getattr(a.terms, name).item(), getattr(b.terms, name).item()
        assert x == pytest.approx(y, rel=1e-5), name
    assert b.terms.kl.item() > 1e-6
    loss_a, loss_b = step_loss(a.terms, weights).loss, step_loss(b.terms, weights).loss
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)


@torch.no_grad()
def test_continuous_positions_would_leak_across_samples(micro_model, encoded, packed_setup):
    """The detector works: text positions that do not restart merge the samples into one causal
    sequence, and a later sample's hidden states move by far more than the 1e-5 tolerance."""
    bins, budget, batch, where, _ = packed_setup
    row = next(r for r, b in enumerate(bins) if len(b) >= 2)
    second = bins[row][1]
    off, n = where[second][1], len(encoded[second])
    leaky = replace(batch, position_ids=batch.position_ids.clone())
    leaky.position_ids[0] = torch.arange(budget).expand(len(bins), -1)  # M-RoPE rows untouched
    good, _ = backbone_hidden_states(micro_model.backbone, batch, batch.visual_tokens)
    bad, _ = backbone_hidden_states(micro_model.backbone, leaky, leaky.visual_tokens)
    diff = (good[row, off : off + n] - bad[row, off : off + n]).abs().max().item()
    assert diff > 1e-3, f"leaky packing changed the second sample by only {diff:.2e}"
    print(f"leaky (continuous) text positions move the second sample by {diff:.2e}")
    # ...while the first sample of the row, which sees nothing before it either way, is unchanged.
    first_n = len(encoded[bins[row][0]])
    assert (good[row, :first_n] - bad[row, :first_n]).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- padding share


def _absolute_images(record: dict, root: Path) -> dict:
    for key in ("image", "images"):
        value = record.get(key)
        if isinstance(value, str):
            record[key] = str(root / value)
        elif isinstance(value, list):
            record[key] = [str(root / v) for v in value]
    return record


def test_ffd_padding_share_on_shapesworld(micro_model, tmp_path):
    from orion_mllm.data.shapes.datasets import write_shapes_dataset

    size = micro_model.config.image_spec.gen_image_size
    write_shapes_dataset(
        tmp_path, size=size, n_und=90, n_gen=70, n_edit=40, n_interleaved=0, n_heldout=0, progress=False
    )
    builder = micro_model.sequence_builder()
    encoded = []
    for name in ("und", "gen", "edit"):
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            record = _absolute_images(json.loads(line), tmp_path)
            encoded.append(encode_record(builder, record, record_id=record["id"]))
    assert len(encoded) == 200
    lengths = [len(x) for x in encoded]
    budget = 8 * int(statistics.median(lengths))
    bins = pack_first_fit_decreasing(lengths, budget)
    pad = micro_model.processor.tokenizer.pad_token_id
    full = collate_packed([[encoded[i] for i in b] for b in bins[:-1]], pad, budget)
    overall = collate_packed([[encoded[i] for i in b] for b in bins], pad, budget)
    assert overall.num_real_tokens == sum(lengths)
    print(
        f"ShapesWorld FFD: {len(encoded)} samples, lengths {min(lengths)}-{max(lengths)} "
        f"(median {statistics.median(lengths)}), budget {budget}, {len(bins)} bins; padding share "
        f"{full.padding_share:.2%} without the last bin, {overall.padding_share:.2%} overall"
    )
    assert full.padding_share < 0.05, (
        f"padding share {full.padding_share:.2%} over {len(bins) - 1} full bins (budget {budget})"
    )


def test_unpacked_batch_defaults(encoded):
    batch = collate(encoded[:2], 0)
    assert isinstance(batch, Batch) and not batch.packed and not batch.to("cpu").packed
    assert batch.num_real_tokens == len(encoded[0]) + len(encoded[1])


# ----------------------------------------------------------------------------- per-document attention


def test_document_bounds_restart_where_positions_do():
    from orion_mllm.model.document_attention import document_bounds

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    assert document_bounds(positions) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 7), (7, 9)]]


def test_document_attention_computes_what_the_masked_path_computes(encoded, packed_setup, monkeypatch):
    """``attn_implementation: documents``: each sample of a packed row alone (as the block-diagonal
    mask gives), the same losses and gradients as sdpa's masked path on packed rows, and a padded
    (unpacked) batch through the masked path unchanged; the backbone's attention name is switched for
    the language model only."""
    _, _, batch, _, _ = packed_setup
    reference = OrionModel.from_preset("micro", seed=0)
    documents = OrionModel.from_preset("micro", seed=0, attn_implementation="documents")
    assert documents.backbone.config.text_config._attn_implementation == "orion_documents"
    assert documents.backbone.config.vision_config._attn_implementation == "sdpa"
    from orion_mllm.model import document_attention

    split = []
    real_bounds = document_attention.document_bounds
    monkeypatch.setattr(document_attention, "document_bounds", lambda p: split.append(1) or real_bounds(p))
    _assert_packed_equals_alone(documents, reference, encoded, packed_setup, "per-document")
    assert len(split) == 1  # the packed path ran, and split the rows once for all layers
    teacher_ref, teacher_doc = make_teacher(reference), make_teacher(documents)
    weights = LossWeights(1.0, 1.0, 0.01)
    grads = []
    for model, teacher in ((reference, teacher_ref), (documents, teacher_doc)):
        model.zero_grad()
        out = model(batch, weights, teacher=teacher)
        step_loss(out.terms, weights).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name
    with torch.no_grad():  # padding: the masked path, the same numbers as sdpa's
        padded = collate(encoded, 0)
        a, _ = backbone_hidden_states(reference.backbone, padded, padded.visual_tokens)
        b, _ = backbone_hidden_states(documents.backbone, padded, padded.visual_tokens)
        real = padded.attention_mask.bool()
        assert (a - b)[real].abs().max().item() < 1e-5
