"""Conversation -> model inputs: template text, labels, visual targets, M-RoPE positions, errors."""

from __future__ import annotations

import pytest
import torch

from orion_mllm.data.records import encode_record, parse_conversation
from orion_mllm.images import ImageLoadError
from orion_mllm.sequence import (
    IGNORE_INDEX,
    ConversationError,
    SequenceBuilder,
    attach_visual_tokens,
    collate,
    mrope_positions,
)


@pytest.fixture
def builder(micro_model) -> SequenceBuilder:
    return micro_model.sequence_builder()


def _tok(builder, name):
    return builder.tokenizer.convert_tokens_to_ids(name)


def supervised_text(builder, enc) -> str:
    ids = [
        i for i, lab in zip(enc.input_ids.tolist(), enc.labels.tolist(), strict=True) if lab != IGNORE_INDEX
    ]
    return builder.tokenizer.decode(ids)


def test_template_text_matches_chat_template(builder, images):
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Draw it."},
        {"role": "assistant", "content": [{"type": "image", "image": images["red_circle"]}]},
    ]
    enc = encode_record(builder, conv)
    ours = builder.tokenizer.decode(enc.input_ids.tolist())
    ref = builder.tokenizer.apply_chat_template(conv, tokenize=False)
    # The template writes one <|image_pad|> per image; the processor expands it to N copies.
    ns = enc.image_num_tokens.tolist()
    expanded = ref.split("<|image_pad|>")
    ref = expanded[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(ns, expanded[1:], strict=True))
    assert ours == ref


def test_labels_cover_assistant_text_only(builder, images):
    conv = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["blue_square"]},
                {"type": "text", "text": "Colour?"},
            ],
        },
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "A square."},
    ]
    enc = encode_record(builder, conv)
    assert supervised_text(builder, enc) == "Blue.<|im_end|>A square.<|im_end|>"
    # No user/system token and no image pad is ever a target.
    assert not (enc.labels == _tok(builder, "<|image_pad|>")).any()
    assert enc.visual_positions.numel() == 0  # understanding only: nothing to regress


def test_generated_image_targets_are_the_next_visual_tokens(builder, micro_model, images):
    conv = [
        {"role": "user", "content": "Draw a red circle, then describe it."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Here:"},
                {"type": "image", "image": images["red_circle"]},
                {"type": "text", "text": "It is red."},
            ],
        },
    ]
    enc = attach_visual_tokens(encode_record(builder, conv), micro_model.encode_images)
    n = micro_model.config.image_spec.gen_num_tokens
    assert enc.image_grid_thw.tolist() == [list(micro_model.config.image_spec.gen_grid_thw)]
    assert enc.visual_positions.numel() == n == enc.visual_targets.shape[0]
    # The embedding plan: visual token j sits at the j-th <|image_pad|>.
    pads = (enc.input_ids == _tok(builder, "<|image_pad|>")).nonzero().flatten()
    plan = torch.zeros(len(enc), micro_model.hidden_size)
    plan[pads] = enc.visual_tokens
    # The hidden at position p predicts the token at p + 1: exactly the next visual token.
    assert torch.equal(plan[enc.visual_positions + 1], enc.visual_targets)
    # First predictor is <|vision_start|>; v_N (last pad) predicts <|vision_end|> through CE.
    assert enc.input_ids[enc.visual_positions[0]] == _tok(builder, "<|vision_start|>")
    assert enc.visual_positions[-1] == pads[-2]
    assert supervised_text(builder, enc) == "Here:<|vision_start|><|vision_end|>It is red.<|im_end|>"
    assert enc.labels[pads[-1] + 1] == _tok(builder, "<|vision_end|>")


def test_multi_image_multi_turn_edit(builder, micro_model, images):
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["wide"]},
                {"type": "image", "image": images["blue_square"]},
                {"type": "text", "text": "Compare."},
            ],
        },
        {"role": "assistant", "content": "Different."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["red_circle"]},
                {"type": "text", "text": "Make it blue."},
            ],
        },
        {"role": "assistant", "content": [{"type": "image", "image": images["blue_square"]}]},
    ]
    enc = attach_visual_tokens(encode_record(builder, conv), micro_model.encode_images)
    assert enc.image_is_target.tolist() == [False, False, False, True]
    counts = enc.image_num_tokens.tolist()
    # Different input sizes give different grids; the target uses the fixed generation grid.
    assert counts[0] != counts[1]
    assert counts[3] == micro_model.config.image_spec.gen_num_tokens
    # Targets index only the edited (assistant) image's tokens.
    first_target = sum(counts[:3])
    assert enc.visual_target_index.tolist() == list(range(first_target, first_target + counts[3]))
    assert supervised_text(builder, enc) == "Different.<|im_end|><|vision_start|><|vision_end|><|im_end|>"


def test_unregressed_pictures_are_context_only(builder, micro_model, images):
    """regress_images=False (a data entry's ``regress_images: false``): the same tokens, labels, pixels
    and generation grid, but no visual targets (so no MSE, KL, input noise) and no edit source."""
    draw_ask = [
        {"role": "user", "content": "Make a picture of some shapes."},
        {"role": "assistant", "content": [{"type": "image", "image": images["red_circle"]}]},
        {"role": "user", "content": "How many circles are there?"},
        {"role": "assistant", "content": "1"},
    ]
    side = micro_model.config.image_spec.gen_image_size  # an edit's source has the generation grid
    edit = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images["red_circle"].resize((side, side))},
                {"type": "text", "text": "Make it blue."},
            ],
        },
        {"role": "assistant", "content": [{"type": "image", "image": images["blue_square"]}]},
    ]
    for conv in (draw_ask, edit):
        kept = encode_record(builder, conv)
        context = encode_record(builder, conv, regress_images=False)
        assert kept.visual_positions.numel() == micro_model.config.image_spec.gen_num_tokens
        assert context.visual_positions.numel() == 0 and context.visual_target_index.numel() == 0
        assert context.visual_source_index is None
        for name in (
            "input_ids",
            "labels",
            "position_ids",
            "pixel_values",
            "image_grid_thw",
            "image_is_target",
        ):
            assert torch.equal(getattr(kept, name), getattr(context, name)), name
    assert encode_record(builder, edit).visual_source_index is not None


def test_mrope_positions_follow_rope_index_rules(builder, micro_model, images):
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": images["wide"]}, {"type": "text", "text": "Now draw."}],
        },
        {
            "role": "assistant",
            "content": [{"type": "image", "image": images["red_circle"]}, {"type": "text", "text": "ok"}],
        },
    ]
    enc = encode_record(builder, conv)
    ref, delta = micro_model.backbone.model.get_rope_index(
        enc.input_ids[None], enc.mm_token_type_ids[None], image_grid_thw=enc.image_grid_thw
    )
    assert torch.equal(enc.position_ids[1:], ref[:, 0])
    assert enc.rope_delta == int(delta)
    assert torch.equal(enc.position_ids[0], torch.arange(len(enc)))  # text row for packing

    # Explicit rule for the generated image: grid (1, h, w) merged to (h', w') starting at p.
    pads = (enc.input_ids == _tok(builder, "<|image_pad|>")).nonzero().flatten()
    n_in = int(enc.image_num_tokens[0])
    gen_pads = pads[n_in:]
    _, h, w = enc.image_grid_thw[1].tolist()
    hh, ww = h // 2, w // 2
    p = int(enc.position_ids[1, gen_pads[0] - 1]) + 1  # right after <|vision_start|>
    ys, xs = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    expected = torch.stack([torch.full((hh * ww,), p), p + ys.flatten(), p + xs.flatten()])
    assert torch.equal(enc.position_ids[1:, gen_pads], expected)
    # Text after the image continues at p + max(h', w') on all three rows.
    end = int(gen_pads[-1]) + 1
    assert enc.input_ids[end] == _tok(builder, "<|vision_end|>")
    assert enc.position_ids[1:, end].tolist() == [p + max(hh, ww)] * 3
    assert enc.position_ids[1:, end + 1].tolist() == [p + max(hh, ww) + 1] * 3


def test_mrope_positions_pure_function_on_adjacent_images():
    # Two images back to back (no text between) must still be split by their grid sizes.
    types = torch.tensor([0, 0] + [1] * 4 + [1] * 6 + [0])
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
    pos = mrope_positions(types, grid, spatial_merge_size=2)
    assert pos.shape == (3, 13)
    assert pos[:, 2].tolist() == [2, 2, 2]
    assert pos[:, 6].tolist() == [4, 4, 4]  # second image starts at 2 + max(2, 2)
    assert pos[:, 12].tolist() == [7, 7, 7]  # text after: 4 + max(2, 3)


def test_record_formats_agree(builder, images, tmp_path):
    path = tmp_path / "a.png"
    images["red_circle"].save(path)
    structured = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "\nWhat is it?"}],
        },
        {"role": "assistant", "content": "A circle."},
    ]
    llava = {
        "id": "x1",
        "image": str(path),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A circle."},
        ],
    }
    swift = {
        "messages": [
            {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A circle."},
        ],
        "images": [str(path)],
    }
    encs = [encode_record(builder, r) for r in (structured, llava, swift)]
    for enc in encs[1:]:
        assert torch.equal(enc.input_ids, encs[0].input_ids)
        assert torch.equal(enc.labels, encs[0].labels)
        assert torch.equal(enc.pixel_values, encs[0].pixel_values)


def test_generation_prompt(builder):
    enc = encode_record(builder, [{"role": "user", "content": "Draw a cat."}], add_generation_prompt=True)
    assert builder.tokenizer.decode(enc.input_ids.tolist()).endswith("<|im_start|>assistant\n")
    assert (enc.labels == IGNORE_INDEX).all()


def test_encode_takes_parsed_messages(builder):
    """Record formats are parsed in data/ (data.records); the encoder takes their result only."""
    conv = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    enc = builder.encode(parse_conversation(conv, "c1"), "c1")
    assert torch.equal(enc.input_ids, encode_record(builder, conv, "c1").input_ids)
    for raw in (conv, {"messages": conv}):
        with pytest.raises(TypeError, match=r"record c2: .*parse_conversation"):
            builder.encode(raw, "c2")
    with pytest.raises(ConversationError, match="no messages"):
        builder.encode([])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {
                "id": "r7",
                "images": ["a.png"],
                "conversations": [{"from": "human", "value": "<image><image> hi"}],
            },
            "record r7: 2 '<image>' placeholder(s) but 1 image(s) given",
        ),
        (
            {"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": "<image> hi"}]},
            "1 '<image>' placeholder(s) but 2 image(s) given",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": []}, "no messages"),
        ({"text": "hi"}, "expected a 'messages' or 'conversations' field"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "unsupported type 'video'"),
    ],
)
def test_bad_records_name_the_problem(record, message):
    with pytest.raises(ConversationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_conversation(record, record_id="r7" if "id" in record else "")


def test_missing_and_corrupt_images_name_record_and_file(builder, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match=r"record r1, image 0: image file not found: .*nope\.png"):
        encode_record(
            builder, {"messages": [{"role": "user", "content": "<image>x"}], "images": [str(missing)]}, "r1"
        )
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageLoadError, match=r"record r2, image 0: cannot read image .*bad\.png"):
        encode_record(
            builder, {"messages": [{"role": "user", "content": "<image>x"}], "images": [str(corrupt)]}, "r2"
        )


def test_collate_offsets(builder, micro_model, images):
    a = attach_visual_tokens(
        encode_record(
            builder,
            [
                {"role": "user", "content": "Draw."},
                {"role": "assistant", "content": [{"type": "image", "image": images["red_circle"]}]},
            ],
        ),
        micro_model.encode_images,
    )
    b = attach_visual_tokens(
        encode_record(
            builder,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": images["wide"]},
                        {"type": "text", "text": "Redo."},
                    ],
                },
                {"role": "assistant", "content": [{"type": "image", "image": images["blue_square"]}]},
            ],
        ),
        micro_model.encode_images,
    )
    batch = collate([a, b], builder.tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, max(len(a), len(b)))
    assert torch.equal(batch.visual_targets[: a.visual_targets.shape[0]], a.visual_targets)
    assert torch.equal(batch.visual_targets[a.visual_targets.shape[0] :], b.visual_targets)
    assert batch.visual_positions[:, 0].tolist() == [0] * len(a.visual_positions) + [1] * len(
        b.visual_positions
    )


def test_null_image_columns_mean_no_images(builder):
    swift = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "images": None,
    }
    llava = {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
        "image": None,
    }
    a, b = encode_record(builder, swift), encode_record(builder, llava)
    assert torch.equal(a.input_ids, b.input_ids) and a.pixel_values is None


@pytest.mark.parametrize("text", ["I <|vision_start|> ok", "stop<|im_end|>here", "<|endoftext|>"])
def test_literal_special_tokens_in_text_are_rejected(builder, text):
    conv = {
        "id": "s1",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}],
    }
    with pytest.raises(ConversationError, match="record s1: text part 1 contains special token"):
        encode_record(builder, conv, "s1")
