"""orion quickstart / ablate / eval drift end to end on the micro preset, and the drift numerics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from orion_mllm.cli import main
from orion_mllm.data.shapes.scorer import CATEGORIES
from orion_mllm.eval.drift import compare_logits
from orion_mllm.train.metrics import read_metrics
from orion_mllm.workflow.evaluate import stale_parts
from orion_mllm.workflow.quickstart import EVAL_SIZES
from orion_mllm.workflow.report import METRIC_KEYS

# A smoke budget: every stage runs a few steps, every evaluation a few items (recorded in metrics.json).
SMOKE = ["--max-steps", "4", "--eval-limit", "6"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "micro"
    assert main(["quickstart", "--preset", "micro", "--out", str(out), *SMOKE]) == 0
    return out


def test_quickstart_writes_report_metrics_and_a_usable_model(quickstart, capsys):
    metrics = json.loads((quickstart / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics)
    assert {f"gen_{c}" for c in CATEGORIES} <= set(metrics)
    assert metrics["preset"] == "micro" and metrics["max_steps"] == 4 and metrics["eval_limit"] == 6
    for key in (
        "base_und_accuracy",
        "final_und_accuracy",
        "gen_overall",
        "edit_accuracy",
        "gen_unseen_overall",
        "interleaved_accuracy",
        "interleaved_swapped_accuracy",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    # The smoke set's prompts split into seen and unseen captions (the unseen ones scored apart).
    assert metrics["gen_unseen_prompts"] + metrics["gen_seen_prompts"] == metrics["final_gen"]["samples"]
    by_reason = metrics["final_gen"]["unseen_by_reason"]
    assert sum(r["prompts"] for r in by_reason.values()) == metrics["gen_unseen_prompts"]
    assert set(by_reason) <= {"held_out_caption", "new_combination"}  # the recipes hold captions out
    assert math.isfinite(metrics["drift_kl_final"]) and metrics["drift_kl_final"] > 0
    assert metrics["wall_minutes"] > 0
    # The final model carries its decoder, and the inference commands take it as it is.
    model = Path(metrics["model_dir"])
    assert (model / "decoder").is_dir() and (model / "vision_head.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "a red circle", "-o", str(quickstart / "x.png")]) == 0
    assert (quickstart / "x.png").is_file()
    # The report: the metrics table and every figure it links to.
    report = (quickstart / "report.md").read_text()
    assert "| shapes-und overall" in report and "shapes-gen overall" in report and "**model:**" in report
    for png in (
        "report/generations.png",
        "report/edits.png",
        "report/loss_curves.png",
        "eval/final/drift/drift.png",
    ):
        assert f"({png})" in report and (quickstart / png).stat().st_size > 1000, png


def test_trainer_logs_drift_kl_in_stages_2_and_3(quickstart):
    for stage in ("stage2_pretrain", "stage3_sft"):
        rows = read_metrics(quickstart / stage)
        probed = [r for r in rows if r.get("drift_kl") is not None]
        # The probe runs at step 0 and on the last step (every 25 steps in between).
        assert [r["step"] for r in probed] == [0, rows[-1]["step"]], stage
        assert all(math.isfinite(r["drift_kl"]) and r["drift_kl"] >= 0 for r in probed)
    assert any(f.name.startswith("events") for f in (quickstart / "stage2_pretrain" / "tb").iterdir())


def test_quickstart_rerun_skips_finished_steps_and_redoes_only_missing_ones(quickstart, capsys):
    state = json.loads((quickstart / "quickstart.json").read_text())
    stamps = {s: (quickstart / s / "run.json").stat().st_mtime_ns for s in ("stage0_base", "stage3_sft")}
    capsys.readouterr()
    assert main(["quickstart", "--preset", "micro", "--out", str(quickstart), *SMOKE]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == len(state["steps"]) == 9
    assert {s: (quickstart / s / "run.json").stat().st_mtime_ns for s in stamps} == stamps

    # An evaluation that did not finish: only it and the report run again.
    del state["steps"]["eval_final"], state["steps"]["report"]
    (quickstart / "quickstart.json").write_text(json.dumps(state))
    (quickstart / "eval" / "final" / "gen.json").unlink()
    assert main(["quickstart", "--preset", "micro", "--out", str(quickstart), *SMOKE]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 7
    assert (quickstart / "eval" / "final" / "gen.json").is_file()
    assert {s: (quickstart / s / "run.json").stat().st_mtime_ns for s in stamps} == stamps
    # Each part's size is recorded beside it; a part computed at another size counts as not done.
    final = quickstart / "eval" / "final"
    assert json.loads((final / "eval_sizes.json").read_text())["und"] == 6  # --eval-limit
    assert stale_parts(final, ("und", "gen"), EVAL_SIZES["micro"].limited(6)) == []
    assert stale_parts(final, ("und", "gen"), EVAL_SIZES["micro"].limited(5)) == ["und", "gen"]
    sizes = (final / "eval_sizes.json").read_text()
    (final / "eval_sizes.json").unlink()  # results from before sizes were recorded: size unknown
    assert stale_parts(final, ("und",), EVAL_SIZES["micro"].limited(6)) == ["und"]
    (final / "eval_sizes.json").write_text(sizes)

    # Other settings on the same folder are refused, naming what changed.
    with pytest.raises(ValueError, match="max_steps 4 -> 5"):
        main(["--debug", "quickstart", "--preset", "micro", "--out", str(quickstart), "--max-steps", "5",
              "--eval-limit", "6"])  # fmt: skip


def test_drift_of_a_model_with_itself_is_zero_and_with_its_base_is_not(quickstart, tmp_path, capsys):
    model = quickstart / "model"
    data = quickstart / "data" / "eval"
    args = ["eval", "drift", "--data", str(data), "--n", "6"]
    assert main([*args, "--base", str(model), "--model", str(model), "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "drift.json").read_text())
    assert same["drift_kl"] < 1e-6 and same["drift_top5_overlap"] == 1.0 and same["positions"] == 6 * 9
    assert (tmp_path / "same" / "drift.png").stat().st_size > 1000
    base = quickstart / "stage0_base" / "final"
    assert main([*args, "--base", str(base), "--model", str(model), "--out", str(tmp_path / "base")]) == 0
    drift = json.loads((tmp_path / "base" / "drift.json").read_text())
    assert drift["drift_kl"] > 1e-3 and drift["drift_top5_overlap"] < 1.0
    table = (tmp_path / "base" / "drift.md").read_text()
    assert "| visual index | KL(base ‖ model) | top-k overlap |" in table and "| 8 |" in table
    # A folder of images works as the probe too (each the answer to a generic drawing request).
    folder = tmp_path / "pngs"
    folder.mkdir()
    for p in sorted((data / "images" / "edit").glob("*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    assert main(["eval", "drift", "--base", str(base), "--model", str(model), "--images", str(folder),
                 "--out", str(tmp_path / "folder")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "folder" / "drift.json").read_text())["positions"] == 3 * 9
    capsys.readouterr()
    assert (
        main(
            ["eval", "drift", "--base", str(base), "--model", str(model), "--images", str(tmp_path / "nope")]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err


def test_ablate_on_micro_produces_its_table(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["ablate", "--preset", "micro", "--seeds", "1", "--configs", "E0", "G", "--out", str(out),
                 "--max-steps", "3", "--eval-limit", "4"]) == 0  # fmt: skip
    table = json.loads((out / "ablation.json").read_text())
    rows = {r["config"]: r for r in table["rows"]}
    assert set(rows) == {"E0", "G"}
    assert rows["E0"]["warmup"] == "none" and not rows["E0"]["kl"] and rows["G"]["kl"]
    for r in rows.values():
        for part in ("und", "gen", "edit", "drift"):
            assert r[part]["n"] == 1 and r[part]["std"] == 0.0 and len(r[f"{part}_per_seed"]) == 1
    # E0 skips stage 1; G warms the head up first.
    assert not (out / "E0" / "seed0" / "stage1_warmup").exists()
    assert (out / "G" / "seed0" / "stage1_warmup" / "final").is_dir()
    # G trains with the KL term, E0 without it.
    assert all(r["kl"] is not None for r in read_metrics(out / "G" / "seed0" / "stage2_pretrain"))
    assert all(r["kl"] is None for r in read_metrics(out / "E0" / "seed0" / "stage2_pretrain"))
    md = (out / "ablation.md").read_text()
    assert "| E0 | mlp | × | none |" in md and "| G | mlp | ✓ | large |" in md
    with pytest.raises(ValueError, match="unknown"):
        main(["--debug", "ablate", "--preset", "micro", "--configs", "Z", "--out", str(out)])


def test_compare_logits_matches_torch_kl_and_counts_topk_overlap():
    torch.manual_seed(0)
    base = torch.randn(5, 40)
    model = base + 0.5 * torch.randn(5, 40)
    kl, overlap, bi, mi, bp, mp = compare_logits(base, model, k=5)
    want = torch.nn.functional.kl_div(
        model.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none"
    )
    assert torch.allclose(kl, want.sum(-1), atol=1e-6)
    assert torch.allclose(bp, base.softmax(-1).topk(5).values) and torch.allclose(
        mp, model.softmax(-1).topk(5).values
    )
    sets = [len(set(b.tolist()) & set(m.tolist())) / 5 for b, m in zip(bi, mi, strict=True)]
    assert overlap.tolist() == pytest.approx(sets)
    kl_same, overlap_same, *_ = compare_logits(base, base.clone(), k=5)
    assert float(kl_same.abs().max()) < 1e-6 and overlap_same.tolist() == [1.0] * 5


def test_eval_commands_score_a_model_and_batching_does_not_change_answers(quickstart, tmp_path, capsys):
    from orion_mllm.eval.model_eval import answer_many, read_jsonl
    from orion_mllm.inference.pipeline import OrionPipeline

    model, data = quickstart / "model", quickstart / "data" / "eval"
    capsys.readouterr()
    assert main(["eval", "shapes-und", "--model", str(model), "--data", str(data), "--n", "6"]) == 0
    und = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert und["questions"] >= 6 and 0 <= und["overall"] <= 1
    # The quickstart's own evaluation of the same records gave the same scores.
    saved = json.loads((quickstart / "eval" / "final" / "und.json").read_text())
    assert und == saved
    assert main(["eval", "shapes-edit", "--model", str(model), "--data", str(data), "--n", "4",
                 "--out", str(tmp_path / "edits")]) == 0  # fmt: skip
    edit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert edit["edits"] == 4 and len(list((tmp_path / "edits").glob("*.png"))) == 4
    assert main(["eval", "shapes-gen", "--model", str(model), "--out", str(tmp_path / "gen")]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gen["samples"] == 552 and set(CATEGORIES) <= set(gen)
    # The same prompt set as a GenEval metadata file through `orion eval geneval` (GenEval's layout),
    # scored by `shapes-score`: the same images, hence the same scores as shapes-gen.
    meta = tmp_path / "shapes_metadata.jsonl"
    assert main(["eval", "shapes-gen", "--write-metadata", str(meta)]) == 0
    assert main(["eval", "geneval", "--model", str(model), "--metadata", str(meta), "--out",
                 str(tmp_path / "geneval"), "--n-samples", "1", "--batch-size", "32"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "shapes-score", "--images", str(tmp_path / "geneval")]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored == {k: gen[k] for k in scored} and scored["samples"] == 552
    for i in (0, 100, 551):
        ours, theirs = (tmp_path / d / f"{i:05d}" for d in ("gen", "geneval"))
        assert (ours / "samples" / "0000.png").read_bytes() == (theirs / "samples" / "0000.png").read_bytes()
        assert (ours / "metadata.jsonl").read_text() == (theirs / "metadata.jsonl").read_text()
    # A plain-Qwen stage-0 base needs its image size; a folder that is not the eval set is refused.
    base = quickstart / "stage0_base" / "final"
    assert (
        main(["eval", "shapes-und", "--model", str(base), "--data", str(data), "--n", "3", "--size", "48"])
        == 0
    )
    train_data = str(quickstart / "data" / "shapes-micro")
    assert (
        main(["eval", "shapes-und", "--model", str(base), "--data", train_data, "--n", "3", "--size", "48"])
        == 2
    )
    assert "not the evaluation set" in capsys.readouterr().err

    pipe = OrionPipeline.load(model, image_separator="\n")
    records = read_jsonl(data / "und.jsonl")[:6]
    queries = [(data / r["image"], r["conversations"][:1]) for r in records]
    one = answer_many(pipe, queries, batch_size=1, progress=False)
    assert answer_many(pipe, queries, batch_size=4, progress=False) == one


def test_ablate_can_share_a_finished_quickstart_base(quickstart, tmp_path):
    stamp = (quickstart / "stage0_base" / "run.json").stat().st_mtime_ns
    out = tmp_path / "ab"
    assert main(["ablate", "--preset", "micro", "--seeds", "1", "--configs", "E", "--out", str(out),
                 "--base", str(quickstart), "--max-steps", "4", "--eval-limit", "4"]) == 0  # fmt: skip
    assert (quickstart / "stage0_base" / "run.json").stat().st_mtime_ns == stamp and not (
        out / "base"
    ).exists()
    # "small" warm-up: a quarter of stage 1's (capped) steps; the other stages run the cap.
    assert len(read_metrics(out / "E" / "seed0" / "stage1_warmup")) == 1
    assert len(read_metrics(out / "E" / "seed0" / "stage2_pretrain")) == 4
    run = json.loads((out / "E" / "seed0" / "stage2_pretrain" / "run.json").read_text())
    assert run["teacher"] == str((quickstart / "stage0_base" / "final").resolve())
    # The base's understanding is measured on the configurations' records (4 here, not the base run's 6).
    base_und = json.loads((out / "base_eval" / "und.json").read_text())
    assert json.loads((out / "base_eval" / "eval_sizes.json").read_text())["und"] == 4
    assert json.loads((out / "ablation.json").read_text())["base_und"] == base_und["overall"]
    # --report-only trains nothing and tabulates what finished: E's one seed, F (never run) left out.
    stamp = (out / "E" / "seed0" / "stage3_sft" / "run.json").stat().st_mtime_ns
    common = ["--out", str(out), "--base", str(quickstart), "--max-steps", "4", "--eval-limit", "4"]
    report = ["ablate", "--preset", "micro", "--seeds", "2", "--report-only", *common]
    assert main([*report, "--configs", "E", "F"]) == 0
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["config"], r["und"]["n"]) for r in rows] == [("E", 1)]
    assert "| E | mlp | × | small | 1 |" in (out / "ablation.md").read_text()
    assert (out / "E" / "seed0" / "stage3_sft" / "run.json").stat().st_mtime_ns == stamp
    assert not (out / "F").exists()
    with pytest.raises(ValueError, match="no finished and evaluated run of configurations F"):
        main(["--debug", *report, "--configs", "F"])
    with pytest.raises(FileNotFoundError, match="not a quickstart run"):
        main(["--debug", "ablate", "--preset", "micro", "--out", str(out), "--base", str(tmp_path)])


def test_report_grid_ends_with_two_held_out_captions():
    """The report's image grid shows trained prompts, then two captions training never saw."""
    from orion_mllm.data.shapes.datasets import is_held_out_caption
    from orion_mllm.workflow.report import GRID_PROMPTS

    assert [is_held_out_caption(p) for p in GRID_PROMPTS] == [False] * (len(GRID_PROMPTS) - 2) + [True] * 2


def test_max_steps_caps_a_stage_and_never_lengthens_it():
    """``--max-steps`` (quickstart, ablation) is a cap: a 500-step stage stays at 500 under 700."""
    from orion_mllm.train.recipe import load_recipe
    from orion_mllm.workflow.quickstart import recipe_path
    from orion_mllm.workflow.train_stage import step_cap

    stage3 = load_recipe(recipe_path("tiny", "stage3_sft"))
    assert stage3.train.max_steps == 500
    assert step_cap(stage3, 700) == ["train.max_steps=500"]
    assert step_cap(stage3, 50) == ["train.max_steps=50"]
    assert step_cap(stage3, None) == []
    unbounded = load_recipe(recipe_path("tiny", "stage3_sft"), ["train.max_steps=null"])
    assert step_cap(unbounded, 700) == ["train.max_steps=700"]
