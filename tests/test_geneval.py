"""``orion eval geneval``: GenEval's exact folder layout, resuming, and clear errors for bad metadata."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from orion_mllm.cli import main
from orion_mllm.eval.geneval import default_metadata, read_metadata
from orion_mllm.model.orion import OrionModel
from serve_utils import save_with_decoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A micro ORION model directory carrying its decoder in decoder/."""
    micro = OrionModel.from_preset("micro", seed=5).eval()
    return save_with_decoder(micro, tmp_path_factory.mktemp("geneval") / "model")


def _six_prompts(tmp_path) -> tuple:
    """The first six lines of GenEval's shipped prompt file, as its own metadata file."""
    lines = default_metadata().read_text().splitlines()[:6]
    path = tmp_path / "six.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_shipped_prompt_file_is_genevals_553_prompts():
    prompts = read_metadata(default_metadata())
    assert len(prompts) == 553
    assert prompts[0].meta == {
        "tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"
    }  # fmt: skip
    assert {p.meta["tag"] for p in prompts} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }  # fmt: skip
    assert (default_metadata().parent / "LICENSE").read_text().startswith("MIT License")


def test_export_writes_genevals_layout_and_resumes(model_dir, tmp_path, capsys):
    meta, lines = _six_prompts(tmp_path)
    out = tmp_path / "out"
    argv = ["eval", "geneval", "--model", model_dir, "--metadata", str(meta), "--out", str(out),
            "--n-samples", "2", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"prompts": 6, "written": 6, "skipped": 0, "samples_per_prompt": 2}
    # One folder per line, in order, named by a 5-digit index; nothing else at the top.
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(6)]
    side = OrionModel.from_pretrained(model_dir).config.image_spec.gen_image_size
    for i, line in enumerate(lines):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == line + "\n"
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        for png in (folder / "samples").iterdir():
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size == (side, side)
    first = (out / "00003" / "samples" / "0001.png").read_bytes()
    stamp = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns

    # A second run skips every finished prompt and touches nothing.
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 0 and summary["skipped"] == 6
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == stamp

    # An interrupted prompt (one image lost, no metadata yet) is redone: the same image comes back,
    # since each image's noise has its own seed whatever else is in the batch.
    (out / "00003" / "samples" / "0001.png").unlink()
    (out / "00003" / "metadata.jsonl").unlink()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 1 and summary["skipped"] == 5
    assert (out / "00003" / "samples" / "0001.png").read_bytes() == first
    assert (out / "00003" / "metadata.jsonl").read_text() == lines[3] + "\n"

    # --limit takes the first prompts; the two samples of a prompt differ (their own noise).
    out2 = tmp_path / "limited"
    assert main([*argv[:6], "--out", str(out2), "--n-samples", "2", "--limit", "2"]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["00000", "00001"]
    a, b = ((out2 / "00000" / "samples" / n).read_bytes() for n in ("0000.png", "0001.png"))
    assert a != b


def test_a_folder_holding_another_prompt_is_never_overwritten(model_dir, tmp_path, capsys):
    meta, _ = _six_prompts(tmp_path)
    out = tmp_path / "out"
    (out / "00001" / "samples").mkdir(parents=True)
    (out / "00001" / "metadata.jsonl").write_text('{"prompt": "someone else\'s"}\n')
    (out / "00001" / "samples" / "0000.png").write_bytes(b"theirs")
    assert main(["eval", "geneval", "--model", model_dir, "--metadata", str(meta), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "00001/metadata.jsonl holds another prompt than line 2" in err and len(err.strip().splitlines()) == 1
    )
    assert (out / "00001" / "samples" / "0000.png").read_bytes() == b"theirs"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ("[1, 2]", "line 3: expected a JSON object, got list"),
        ('{"tag": "colors", "include": []}', "line 3: field 'prompt' must be a non-empty string"),
        ('{"prompt": ""}', "line 3: field 'prompt' must be a non-empty string"),
    ],
)
def test_a_malformed_metadata_line_is_named_by_its_number(model_dir, tmp_path, capsys, bad, message):
    meta, lines = _six_prompts(tmp_path)
    meta.write_text("\n".join([*lines[:2], bad, *lines[3:]]) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "geneval", "--model", model_dir, "--metadata", str(meta), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{meta} {message}" in err and len(err.splitlines()) == 1
    assert not out.exists()  # refused before anything is generated


def test_bad_options_are_refused(model_dir, tmp_path, capsys):
    meta, _ = _six_prompts(tmp_path)
    base = ["eval", "geneval", "--model", model_dir, "--metadata", str(meta), "--out", str(tmp_path / "o")]
    assert main([*base, "--n-samples", "0"]) == 2
    assert "--n-samples 0" in capsys.readouterr().err
    assert main([*base, "--limit", "0"]) == 2
    assert "--limit 0" in capsys.readouterr().err
    assert main(["eval", "geneval", "--model", model_dir, "--metadata", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "nope.jsonl: no such metadata file" in capsys.readouterr().err
