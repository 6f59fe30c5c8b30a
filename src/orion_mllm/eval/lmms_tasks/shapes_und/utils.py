"""The ShapesWorld understanding task for lmms-eval (``shapes_und.yaml`` beside this file).

Documents are :func:`orion_mllm.eval.shapes_und_edit.understanding_questions` of a ShapesWorld
folder's ``und.jsonl``, and answers are judged by its ``answer_is_right`` and aggregated by its
``accuracy_by_qtype``, so the harness's numbers are ``orion eval shapes-und``'s, question by question.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableMessagesTask
from PIL import Image

from orion_mllm.data.shapes.datasets import question_of
from orion_mllm.eval.shapes_und_edit import accuracy_by_qtype, answer_is_right, understanding_questions

DATA_ENV, N_ENV, ORDER_ENV = "ORION_SHAPES_DATA", "ORION_SHAPES_N", "ORION_SHAPES_QUESTION_FIRST"
IMAGE_PLACEHOLDER = "<image>"


def read_documents(
    root: str | Path, n: int | None = None, question_first: bool = False
) -> list[dict[str, Any]]:
    """One document per question of the first ``n`` records of ``root/und.jsonl`` (the picture after the
    first question with ``question_first``); nested fields as JSON text so every document has one flat
    schema."""
    root = Path(root)
    und = root / "und.jsonl"
    if not und.is_file():
        raise FileNotFoundError(f"{und}: no ShapesWorld understanding records ({DATA_ENV} must name a "
                                "folder written by `orion data shapes`)")  # fmt: skip
    records = []
    with und.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{und} line {number}: not valid JSON ({err.msg})") from err
            if n is not None and len(records) >= n:
                break
    return [
        {"doc_id": k, "qtype": q["qtype"], "group": q["group"], "image": str((root / q["image"]).resolve()),
         "turns": json.dumps(q["turns"]), "gold": q["gold"] or "", "scene": json.dumps(q["scene"])}
        for k, q in enumerate(understanding_questions(records, question_first))
    ]  # fmt: skip


class ShapesUndTask(ConfigurableMessagesTask):
    """lmms-eval's messages task whose data is a local ShapesWorld folder instead of a hub dataset."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # The YAML's `class:` key (how the harness found this class) is not a task setting.
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise ValueError(
                f"shapes_und: set {DATA_ENV} to a ShapesWorld evaluation folder (orion eval lmms --data "
                "DIR sets it; `orion data shapes` writes one)"
            )
        n = os.environ.get(N_ENV)
        if n is not None and not (n.isdigit() and int(n) > 0):
            raise ValueError(f"shapes_und: {N_ENV}={n!r}: expected a positive number of records")
        order = os.environ.get(ORDER_ENV, "0")
        if order not in ("0", "1"):
            raise ValueError(f"shapes_und: {ORDER_ENV}={order!r}: expected 0 (picture first) or 1")
        docs = read_documents(root, int(n) if n else None, question_first=order == "1")
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset


def _question(doc: dict[str, Any]) -> dict[str, Any]:
    return {"qtype": doc["qtype"], "group": doc["group"], "gold": doc["gold"] or None,
            "scene": json.loads(doc["scene"])}  # fmt: skip


def doc_to_messages(
    doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None
) -> list[dict[str, Any]]:
    """The LLaVA-form turns as chat messages: the record's picture where the first user turn holds it
    (before the question, or after it for a question-first document)."""
    messages = []
    for k, turn in enumerate(json.loads(doc["turns"])):
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        content: list[dict[str, Any]] = []
        if k == 0 and IMAGE_PLACEHOLDER in text:
            # As orion_mllm.eval.model_eval.session_from_turns reads the turn (the prompts are compared
            # in tests/test_lmms.py): text before the picture as written, the newline after it dropped.
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            after = after.lstrip("\n")
            content = [{"type": "text", "text": before}] if before else []
            content.append({"type": "image", "url": Image.open(doc["image"]).convert("RGB")})
            content += [{"type": "text", "text": after}] if after else []
        else:
            content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The last question (what the harness logs as the prompt)."""
    return question_of(json.loads(doc["turns"])[-1]["value"])


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """The judged answer under every metric name; each aggregation keeps its own question type."""
    item = {
        "qtype": doc["qtype"],
        "group": doc["group"],
        "right": answer_is_right(_question(doc), results[0]),
    }
    return {name: item for name in ("overall", *QTYPES)}


QTYPES = ("caption", "colour", "count", "existence", "mcq", "position", "shape")


def _scores(items: list[dict[str, Any]]) -> dict[str, float]:
    return accuracy_by_qtype(({"qtype": i["qtype"], "group": i["group"]}, i["right"]) for i in items)


def aggregate_overall(items: list[dict[str, Any]]) -> float:
    """Mean over question types of each type's accuracy (``orion eval shapes-und``'s ``overall``)."""
    return _scores(items)["overall"]


def _by_type(qtype: str):
    def aggregate(items: list[dict[str, Any]]) -> float:
        # A type the evaluated documents do not hold (e.g. under --limit) has no accuracy: NaN, not 0.
        return _scores(items).get(qtype, float("nan"))

    aggregate.__name__ = f"aggregate_{qtype}"
    return aggregate


aggregate_caption = _by_type("caption")
aggregate_colour = _by_type("colour")
aggregate_count = _by_type("count")
aggregate_existence = _by_type("existence")
aggregate_mcq = _by_type("mcq")
aggregate_position = _by_type("position")
aggregate_shape = _by_type("shape")
