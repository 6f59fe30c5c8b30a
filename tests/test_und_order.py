"""Where the picture stands in an understanding question: the evaluation asks as training read it.

ShapesWorld's ``question_first`` data writes ``Q\\n<image>`` (tiny recipes); the default ``<image>\\nQ``.
``shapes-und`` asks either way (``question_first``), and its prompt must be token for token what the
training encoder made of the record up to the answer: a stray newline after the picture (what the
evaluation fed before session 17) is a prompt the model never saw.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from orion_mllm.data.records import encode_record
from orion_mllm.data.shapes.datasets import write_shapes_dataset
from orion_mllm.eval.model_eval import session_from_turns
from orion_mllm.eval.shapes_und_edit import score_understanding, understanding_questions
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.model.orion import OrionModel
from orion_mllm.workflow.evaluate import EvalSizes, stale_parts

SMALL = {"n_und": 40, "n_gen": 0, "n_edit": 0, "n_interleaved": 0, "n_heldout": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    write_shapes_dataset(root / "plain", size=48, seed=2, progress=False, **SMALL)
    write_shapes_dataset(
        root / "first", size=48, seed=2, progress=False, question_first=True, mcq_answer="reasoned", **SMALL
    )
    return root


def _records(path):
    return [json.loads(line) for line in (path / "und.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("question_first", [False, True])
def test_the_questions_are_the_same_whichever_order_the_records_were_written_in(folders, question_first):
    plain = list(understanding_questions(_records(folders / "plain"), question_first))
    first = list(understanding_questions(_records(folders / "first"), question_first))
    assert plain == first and len(plain) > 40  # multiple choice is asked once per rotation
    for q in plain:
        opening = q["turns"][0]["value"]
        assert opening.count("<image>") == 1
        assert opening.endswith("\n<image>") if question_first else opening.startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in q["turns"][1:])
    mcq = [q for q in plain if q["qtype"] == "mcq"]
    assert mcq and all(q["gold"] in "ABCD" for q in mcq)


def test_the_evaluation_prompt_is_what_training_encoded(folders):
    """For both orders, a question's prompt (the pipeline's, as ``shapes-und`` builds it) equals the
    training encoding of the same record up to the assistant's answer."""
    pipe = OrionPipeline(OrionModel.from_preset("micro", seed=1).eval(), image_separator="\n")
    for name in ("plain", "first"):
        record = next(r for r in _records(folders / name) if r["qtype"] != "mcq")
        image = Image.open(folders / name / record["image"]).convert("RGB")
        encoded = encode_record(pipe.builder, {**record, "image": image})
        prompt = pipe.prompt(session_from_turns(image, record["conversations"][:1])).input_ids
        assert torch.equal(encoded.input_ids[: prompt.numel()], prompt), name
        # The next token trained is the answer's first: the prompt ends where the answer starts.
        answer_ids = pipe.engine.tokenizer(record["conversations"][1]["value"])["input_ids"]
        assert encoded.input_ids[prompt.numel()].item() == answer_ids[0]


def test_the_order_reaches_the_model_and_a_result_in_the_other_order_is_stale(folders, tmp_path):
    records = _records(folders / "plain")
    seen: list[str] = []

    def answer(image, turns):
        seen.append(turns[0]["value"])
        return "red"

    score_understanding(records, folders / "plain", answer, question_first=True)
    assert seen and all(v.endswith("\n<image>") for v in seen)
    sizes = EvalSizes(und=40)
    (tmp_path / "eval_sizes.json").write_text(json.dumps({"und": 40}))
    (tmp_path / "und.json").write_text(json.dumps({"overall": 0.5, "question_first": True}))
    assert stale_parts(tmp_path, ("und",), sizes, question_first=True) == []
    assert stale_parts(tmp_path, ("und",), sizes, question_first=False) == ["und"]
    (tmp_path / "und.json").write_text(json.dumps({"overall": 0.5}))  # from before the setting: picture first
    assert stale_parts(tmp_path, ("und",), sizes) == []
    assert stale_parts(tmp_path, ("und",), sizes, question_first=True) == ["und"]


def test_shapes_und_command_asks_question_first(micro_dir, tmp_path, capsys, monkeypatch):
    """``orion eval shapes-und --question-first`` hands the model questions with the picture last;
    without the flag, first."""
    from orion_mllm.cli import main
    from orion_mllm.eval import model_eval

    asked: list[str] = []

    def fake_answers(pipe, queries, **kwargs):
        asked.extend(turns[0]["value"] for _, turns in queries)
        return ["red"] * len(queries)

    monkeypatch.setattr(model_eval, "answer_many", fake_answers)
    argv = ["eval", "shapes-und", "--model", micro_dir, "--data", str(tmp_path / "eval48"), "--n", "8"]
    assert main([*argv, "--size", "48", "--question-first"]) == 0
    assert asked and all(v.endswith("\n<image>") for v in asked)
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["questions"] > 0
    asked.clear()
    assert main([*argv, "--size", "48"]) == 0
    assert asked and all(v.startswith("<image>\n") for v in asked)


def test_an_exported_model_records_the_order_and_asks_that_way(tmp_path, monkeypatch):
    """A stage trained on ``question_first`` data exports ``OrionConfig.question_first``; the pipeline's
    ``ask`` then puts the question first, as the records did (the same prompt tokens as
    ``shapes-und``'s), and ``orion eval shapes-und`` asks so without the flag."""
    from orion_mllm.train.trainer import Trainer
    from train_utils import micro_recipe

    settings = {"size": 48, "n_und": 40, "n_gen": 40, "n_edit": 0, "n_interleaved": 0, "n_heldout": 0,
                "holdout": "captions", "add_layout": "canonical", "question_first": True,
                "mcq_answer": "reasoned"}  # fmt: skip
    root = tmp_path / "data"
    write_shapes_dataset(root, progress=False, **settings)
    base = tmp_path / "base"
    OrionModel.from_preset("micro", seed=3).save_pretrained(base)
    shapes = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())
    recipe = micro_recipe(
        "stage1_warmup.yaml", root, f"model.init={base}", "max_steps=2", f"shapes_data={{{shapes}}}"
    )
    final = Trainer(recipe, tmp_path / "warm", tensorboard=False).run().final_model
    pipe = OrionPipeline.load(final, image_separator="\n")
    assert pipe.question_first and not OrionPipeline.load(base).question_first

    sessions = []
    monkeypatch.setattr(pipe, "reply", lambda session, sampling: sessions.append(session) or type(
        "Reply", (), {"text": "red"})())  # fmt: skip
    image = Image.open(root / _records(root)[0]["image"]).convert("RGB")
    assert pipe.ask([image], "What colour is the star?") == "red"
    asked = pipe.prompt(sessions[0]).input_ids
    turns = [{"from": "human", "value": "What colour is the star?\n<image>"}]
    assert torch.equal(asked, pipe.prompt(session_from_turns(image, turns)).input_ids)

    from orion_mllm.cli import main
    from orion_mllm.eval import model_eval

    asked_turns: list[str] = []

    def fake_answers(pipe, queries, **kwargs):
        asked_turns.extend(turns[0]["value"] for _, turns in queries)
        return ["red"] * len(queries)

    monkeypatch.setattr(model_eval, "answer_many", fake_answers)
    argv = ["eval", "shapes-und", "--model", str(final), "--data", str(tmp_path / "eval48"), "--n", "6"]
    assert main(argv) == 0  # the model's recorded order
    assert asked_turns and all(v.endswith("\n<image>") for v in asked_turns)
    asked_turns.clear()
    assert main([*argv, "--no-question-first"]) == 0
    assert asked_turns and all(v.startswith("<image>\n") for v in asked_turns)
