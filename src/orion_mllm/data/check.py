"""Validate a conversation dataset (JSONL, LLaVA or ms-swift form) without training on it.

``orion data check FILE.jsonl`` reads every line, parses it the way training will
(``orion_mllm.data.records.parse_conversation``), checks that every image file exists (and, with
``--decode``, that it opens), classifies each record as understanding / generation / editing /
text, and reports counts plus every problem with its line number. It never stops at the first bad
line: the point is to see all of them.

Task of a record: an image in an assistant turn makes it *generation*, or *editing* when a user
turn also has an image; images only in user turns make it *understanding*; no image at all is *text*.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from orion_mllm.data.records import parse_conversation
from orion_mllm.images import ImageLoadError, load_image
from orion_mllm.sequence import ConversationError, ImagePart

TASKS = ("understanding", "generation", "editing", "text")


@dataclass
class CheckReport:
    path: str
    records: int = 0
    tasks: Counter = field(default_factory=Counter)
    images: int = 0
    problems: list[str] = field(default_factory=list)
    bad_lines: set[int] = field(default_factory=set)

    def add(self, lineno: int, message: str) -> None:
        self.problems.append(message)
        self.bad_lines.add(lineno)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "records": self.records,
            "valid_records": self.records - len(self.bad_lines - {0}),
            "tasks": {t: self.tasks.get(t, 0) for t in TASKS},
            "images": self.images,
            "problems": len(self.problems),
        }


def record_task(messages) -> str:
    user_image = any(isinstance(p, ImagePart) for m in messages if m.role == "user" for p in m.parts)
    assistant_image = any(
        isinstance(p, ImagePart) for m in messages if m.role == "assistant" for p in m.parts
    )
    if assistant_image:
        return "editing" if user_image else "generation"
    return "understanding" if user_image else "text"


def check_jsonl(
    path: str | Path, *, image_root: str | Path | None = None, decode: bool = False
) -> CheckReport:
    """Check every line of ``path``.

    Image paths are resolved against ``image_root`` (default: the folder holding the file).
    """
    path = Path(path)
    report = CheckReport(str(path))
    if not path.is_file():
        report.add(0, f"{path}:0: file not found")
        return report
    root = Path(image_root) if image_root is not None else path.parent
    with path.open("rb") as handle:  # bytes: one undecodable line must not hide the others
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            report.records += 1
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                report.add(lineno, f"{where}: not UTF-8 ({err.reason} at byte {err.start})")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report.add(lineno, f"{where}: malformed JSON ({err.msg} at column {err.colno})")
                continue
            record_id = str(record.get("id", lineno)) if isinstance(record, dict) else str(lineno)
            try:
                messages = parse_conversation(record, record_id=record_id)
            except (
                ConversationError,
                TypeError,
                AttributeError,
            ) as err:  # the latter: shapes we did not foresee
                report.add(lineno, f"{where}: {err}")
                continue
            if not any(m.role == "assistant" for m in messages):
                report.add(lineno, f"{where}: record {record_id}: no assistant turn (nothing to train on)")
                continue
            report.tasks[record_task(messages)] += 1
            for k, part in enumerate(p for m in messages for p in m.parts if isinstance(p, ImagePart)):
                report.images += 1
                if not isinstance(part.image, str):
                    report.add(lineno, f"{where}: record {record_id}: image {k} is not a path string")
                    continue
                image_path = Path(part.image) if Path(part.image).is_absolute() else root / part.image
                if not image_path.is_file():
                    report.add(lineno, f"{where}: record {record_id}: image {k} not found: {image_path}")
                elif decode:
                    try:
                        load_image(image_path)
                    except ImageLoadError as err:
                        report.add(lineno, f"{where}: record {record_id}: image {k}: {err}")
    if report.records == 0:
        report.add(0, f"{path}: no records")
    return report
