"""``orion data check``: counts per task and every problem, never a crash."""

from __future__ import annotations

import json

from PIL import Image

from orion_mllm.cli import main
from orion_mllm.data.check import check_jsonl


def write_dataset(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        {
            "id": "u1",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "g1",
            "messages": [
                {"role": "user", "content": "Draw a red square."},
                {"role": "assistant", "content": "<image>"},
            ],
            "images": ["red.png"],
        },
        {
            "id": "e1",
            "messages": [
                {"role": "user", "content": "<image>Make it blue."},
                {"role": "assistant", "content": "<image>"},
            ],
            "images": ["red.png", "red.png"],
        },
        {
            "id": "t1",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        },
        "{not json",
        {
            "id": "m1",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "p1",
            "images": ["red.png"],
            "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "b1",
            "image": "broken.png",
            "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}],
        },
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_check_counts_tasks_and_reports_every_problem(tmp_path):
    report = check_jsonl(write_dataset(tmp_path), decode=True)
    assert report.records == 8
    assert dict(report.tasks) == {"understanding": 3, "generation": 1, "editing": 1, "text": 1}
    problems = "\n".join(report.problems)
    assert ":5: malformed JSON" in problems
    assert ":6: record m1: image 0 not found:" in problems and "missing.png" in problems
    assert ":7: record p1: 0 '<image>' placeholder(s) but 1 image(s) given" in problems
    assert ":8: record b1: image 0:" in problems and "cannot read image" in problems
    assert len(report.problems) == 4
    assert report.to_dict()["valid_records"] == 4


def test_check_cli_exit_codes(tmp_path, capsys):
    path = write_dataset(tmp_path)
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["problems"] == 3  # without --decode the broken PNG is not opened
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(path.read_text().splitlines()[:4]) + "\n")
    assert main(["data", "check", str(good)]) == 0
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 1
    assert "file not found" in capsys.readouterr().out


def test_check_survives_odd_lines(tmp_path):
    path = tmp_path / "odd.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    lines = [
        "\ufeff" + good,  # a byte-order mark on line 1 is fine
        json.dumps({"conversations": "hello"}),
        json.dumps({"conversations": [1, 2]}),
        json.dumps({"messages": 5}),
        "5",
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    report = check_jsonl(path)
    assert report.records == 6
    problems = "\n".join(report.problems)
    assert ":2: record 2: 'conversations' must be a list" in problems
    assert ":3: record 3: conversations[0] must be a dict" in problems
    assert ":4: record 4: 'messages' must be a list" in problems
    assert ":5: record 5: expected a list of messages or a dict" in problems
    assert ":6: not UTF-8" in problems
    assert report.to_dict()["valid_records"] == 1


def test_check_empty_file_is_a_problem(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    report = check_jsonl(path)
    assert not report.ok and "no records" in report.problems[0]
