"""``orion eval lmms``: the lmms-eval model class and the shipped ShapesWorld task on a micro model,
end to end offline (in-process and through ``orion serve --api-key``), against ``orion eval shapes-und``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orion_mllm.cli import main
from orion_mllm.eval.model_eval import eval_set, session_from_turns
from orion_mllm.eval.shapes_und_edit import understanding_questions
from orion_mllm.images import load_image
from orion_mllm.inference.pipeline import OrionPipeline

lmms_model = pytest.importorskip("orion_mllm.eval.lmms_model")  # lmms-eval: installed by scripts/install.sh
task_utils = pytest.importorskip("orion_mllm.eval.lmms_tasks.shapes_und.utils")


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    return eval_set(tmp_path_factory.mktemp("lmms") / "eval48", size=48, n_und=200, n_edit=0, n_interleaved=0)


def test_without_lmms_eval_the_command_says_how_to_install_it(micro_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # `import lmms_eval...` now raises ImportError
    monkeypatch.setitem(sys.modules, "lmms_eval.__main__", None)
    argv = ["eval", "lmms", "--model", micro_dir, "--tasks", "shapes_und", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "orion eval lmms needs lmms-eval" in err and "pip install 'orion-mllm[eval]'" in err


def test_documents_are_the_questions_shapes_und_asks(eval_folder):
    records = [json.loads(line) for line in (eval_folder / "und.jsonl").read_text().splitlines()[:40]]
    docs = task_utils.read_documents(eval_folder, 40)
    questions = list(understanding_questions(records))
    assert len(docs) == len(questions) > 40  # dialogues ask several, multiple choice once per rotation
    for doc, q in zip(docs, questions, strict=True):
        assert json.loads(doc["turns"]) == q["turns"] and doc["qtype"] == q["qtype"]
        assert doc["image"] == str((eval_folder / q["image"]).resolve())
    mcq = [d for d in docs if d["qtype"] == "mcq"]
    assert mcq and len({d["group"] for d in mcq}) < len(mcq)  # rotations share their record's group


def test_chat_messages_build_the_prompt_shapes_und_builds(micro_dir, eval_folder):
    """A document through the harness's message path gives the token ids our own evaluation feeds."""
    pipe = OrionPipeline.load(micro_dir, image_separator="\n")
    for question_first in (False, True):
        docs = task_utils.read_documents(eval_folder, 30, question_first=question_first)
        multi_turn = [d for d in docs if len(json.loads(d["turns"])) > 1]
        assert multi_turn, "the eval set should hold dialogues"
        assert json.loads(docs[0]["turns"])[0]["value"].endswith("<image>") == question_first
        for doc in [docs[0], multi_turn[0], next(d for d in docs if d["qtype"] == "mcq")]:
            session = lmms_model.session_from_messages(task_utils.doc_to_messages(doc))
            ours = session_from_turns(load_image(doc["image"]), json.loads(doc["turns"]))
            assert pipe.prompt(session).input_ids.tolist() == pipe.prompt(ours).input_ids.tolist()


def test_a_turn_puts_the_picture_where_its_placeholder_is():
    """``<image>\nQ`` gives picture then text (as ShapesWorld writes); ``Q\n<image>`` keeps the text,
    newline included, before the picture and nothing after it (``question_first`` data)."""
    from PIL import Image

    from orion_mllm.inference.session import UserImage

    image = Image.new("RGB", (8, 8))
    first = session_from_turns(image, [{"from": "human", "value": "<image>\nWhat colour?"}]).turns[0].parts
    after = session_from_turns(image, [{"from": "human", "value": "What colour?\n<image>"}]).turns[0].parts
    assert isinstance(first[0], UserImage) and first[1] == "What colour?"
    assert after[0] == "What colour?\n" and isinstance(after[1], UserImage) and len(after) == 2


def test_the_aggregation_is_circular_for_multiple_choice():
    items = [
        {"qtype": "mcq", "group": "r1/mcq", "right": True},
        {"qtype": "mcq", "group": "r1/mcq", "right": False},  # one rotation wrong: the record is wrong
        {"qtype": "mcq", "group": "r2/mcq", "right": True},
        {"qtype": "mcq", "group": "r2/mcq", "right": True},
        {"qtype": "colour", "group": "r3/0", "right": True},
    ]
    assert task_utils.aggregate_mcq(items) == 0.5
    assert task_utils.aggregate_colour(items) == 1.0
    assert task_utils.aggregate_overall(items) == 0.75
    assert task_utils.aggregate_shape(items) != task_utils.aggregate_shape(items)  # NaN: no shape question


def test_generation_settings_and_stop_strings():
    config, until = lmms_model.sampling_from({"max_new_tokens": 12, "temperature": 0, "until": ["\n\n"]}, 256)
    assert (config.max_new_tokens, config.temperature, config.allow_images, until) == (
        12,
        0.0,
        False,
        ["\n\n"],
    )
    config, until = lmms_model.sampling_from({"temperature": 0.7, "do_sample": False, "until": "Q:"}, 99)
    assert (config.max_new_tokens, config.temperature, until) == (99, 0.0, ["Q:"])  # do_sample false: greedy
    config, _ = lmms_model.sampling_from({"temperature": 0.7, "top_p": 0.9}, 99)
    assert (config.temperature, config.top_p) == (0.7, 0.9)
    assert lmms_model.cut_at("Red.\n\nQ: next", ["\n\n", "Q:"]) == "Red."
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        lmms_model.sampling_from({"max_new_tokens": 0}, 10)


def test_unknown_model_args_and_missing_data_are_refused(micro_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown \['temprature'\]"):
        lmms_model.OrionLmms(pretrained=micro_dir, temprature=0.5)
    monkeypatch.delenv("ORION_SHAPES_DATA", raising=False)
    task = task_utils.ShapesUndTask.__new__(task_utils.ShapesUndTask)
    with pytest.raises(ValueError, match="set ORION_SHAPES_DATA"):
        task.download()
    monkeypatch.setenv("ORION_SHAPES_DATA", "/nonexistent/folder")
    with pytest.raises(FileNotFoundError, match=r"und\.jsonl: no ShapesWorld understanding records"):
        task.download()


def test_the_harness_finds_the_orion_model_class_by_its_entry_point():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    lmms_model.register()
    assert get_model("orion") is lmms_model.OrionLmms
    assert MODEL_REGISTRY_V2.resolve("orion").model_type == "chat"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logged_answers(out: Path) -> dict[int, str]:
    """doc_id -> answer from the harness's --log_samples file under ``out``."""
    (samples,) = out.glob("*/*_samples_shapes_und.jsonl")
    return {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, samples.read_text().splitlines())}


def test_lmms_eval_answers_as_shapes_und_in_process_and_through_the_server(
    micro_dir, eval_folder, tmp_path, capsys, monkeypatch
):
    """`orion eval lmms` with the shipped task gives `orion eval shapes-und`'s scores and the very same
    answers; lmms-eval's own OpenAI-compatible model against `orion serve --api-key` gives them too
    (the README's harness-over-HTTP route, on loopback). A random-init model's answers are long and
    differ with every detail of the prompt, so equal answers mean equal prompts."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from orion_mllm.eval.lmms_tasks import TASKS_DIR
    from orion_mllm.eval.model_eval import answer_many, read_jsonl

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the shipped task never reaches the hub
    model, data, n = Path(micro_dir), eval_folder, 12
    capsys.readouterr()
    assert main(["eval", "shapes-und", "--model", str(model), "--data", str(data), "--n", str(n)]) == 0
    und = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "lmms"
    assert main(["eval", "lmms", "--model", str(model), "--tasks", "shapes_und", "--data", str(data), "--n",
                 str(n), "--output", str(out), "--batch-size", "5", "--", "--log_samples"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "|shapes_und|" in printed and "overall" in printed  # the harness's own table
    harness = json.loads(printed.strip().splitlines()[-1])["results"]["shapes_und"]
    assert harness["overall"] == pytest.approx(und["overall"])
    for qtype in ("caption", "colour", "count", "existence", "mcq", "position", "shape"):
        assert harness[qtype] == (pytest.approx(und[qtype]) if qtype in und else None)
    questions = list(understanding_questions(read_jsonl(data / "und.jsonl")[:n]))
    pipe = OrionPipeline.load(model, image_separator="\n")
    ours = answer_many(pipe, [(data / q["image"], q["turns"]) for q in questions], progress=False)
    in_process = _logged_answers(out)
    assert [in_process[k] for k in range(len(questions))] == ours
    assert len(set(ours)) > len(ours) // 2  # mostly distinct answers: the comparison means something

    # The same task through the server: lmms-eval's `openai` model, the key required by the server.
    port, key = _free_port(), "test-key-123"
    server = subprocess.Popen(
        [sys.executable, "-m", "orion_mllm.cli", "serve", "--model", str(model), "--no-web", "--host",
         "127.0.0.1", "--port", str(port), "--api-key", key, "--served-name", "orion-tiny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
        env = {**os.environ, "ORION_SHAPES_DATA": str(data), "ORION_SHAPES_N": str(n)}
        env["HF_DATASETS_OFFLINE"] = "1"
        served = tmp_path / "served"
        proc = subprocess.run(
            [sys.executable, "-m", "lmms_eval", "--model", "openai", "--model_args",
             f"model_version=orion-tiny,base_url=http://127.0.0.1:{port}/v1,api_key={key}",
             "--tasks", "shapes_und", "--include_path", str(TASKS_DIR), "--output_path", str(served),
             "--log_samples", "--verbosity", "WARNING"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "|shapes_und|" in proc.stdout
        over_http = _logged_answers(served)
        assert [over_http[k] for k in range(len(questions))] == ours
    finally:
        server.terminate()
        server.wait(timeout=30)
