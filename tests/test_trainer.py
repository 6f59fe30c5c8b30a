"""Training engine: resume, crash-safe checkpoints, freezing, anomalies, bad data, FSDP2 equivalence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orion_mllm.data.shapes.datasets import write_shapes_dataset
from orion_mllm.model.orion import HEAD_WEIGHTS_NAME, OrionModel
from orion_mllm.train import checkpoint as ckpt
from orion_mllm.train.anomaly import TrainingDiverged
from orion_mllm.train.loop import DataQualityError
from orion_mllm.train.metrics import read_metrics
from orion_mllm.train.recipe import Recipe
from orion_mllm.train.trainer import Trainer, recipe_changes
from train_utils import RECIPES, REPO, checkpoint_format, losses, micro_recipe, run_python, trainer_script

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    write_shapes_dataset(
        root, size=48, n_und=40, n_gen=40, n_edit=16, n_interleaved=0, n_heldout=0, progress=False
    )
    return root


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A micro ORION model on disk: init and KL teacher of the pretrain/SFT test runs."""
    path = tmp_path_factory.mktemp("base") / "model"
    OrionModel.from_preset("micro", seed=3).save_pretrained(path)
    return path


def _pretrain(shapes_root, base_dir, *overrides):
    return micro_recipe(
        "stage2_pretrain.yaml", shapes_root, f"model.init={base_dir}", f"teacher={base_dir}", *overrides
    )


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


# ------------------------------------------------------------------ resume


def test_resume_after_kill_is_bitwise_identical(tmp_path, shapes_root, base_dir):
    recipe = _pretrain(shapes_root, base_dir, "max_steps=8", "checkpoint.every=4")
    straight = Trainer(recipe, tmp_path / "straight", tensorboard=False).run()

    # Same run in a child process that is SIGKILLed in the middle of step 6 (after the step-4
    # checkpoint, before any later one): no clean shutdown, nothing flushed on purpose.
    killed = tmp_path / "killed"
    kill = "[lambda t, step, rec: os.kill(os.getpid(), signal.SIGKILL) if step == 5 else None]"
    proc = run_python(trainer_script(recipe, killed, callbacks=kill))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.complete_checkpoints(killed)] == [4]
    assert len(read_metrics(killed)) == 6  # steps 0..5 were logged before the kill

    resumed = Trainer(recipe, killed, tensorboard=False).run()
    assert resumed.steps == 8
    got, want = losses(killed), losses(tmp_path / "straight")
    assert [m["step"] for m in read_metrics(killed)] == list(range(8))
    assert got == want  # bitwise: same floats, not just close
    a, b = _weights(straight.final_model), _weights(resumed.final_model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_during_save_resumes_from_previous_checkpoint(tmp_path, shapes_root, base_dir):
    recipe = _pretrain(shapes_root, base_dir, "max_steps=4", "checkpoint.every=2")
    run = tmp_path / "run"
    # Die after every rank wrote its DCP shards for step 4 but before the COMPLETE marker.
    prelude = """
from orion_mllm.train import checkpoint as _ck
_orig = _ck.write_marker
def _die(path):
    if path.name == "step_00000004":
        os.kill(os.getpid(), signal.SIGKILL)
    _orig(path)
_ck.write_marker = _die
"""
    proc = run_python(trainer_script(recipe, run, prelude=prelude))
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = ckpt.checkpoint_dir(run, 4)
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / ckpt.MARKER).exists()
    assert ckpt.latest_checkpoint(run)[0] == 2

    # Re-running the same command (through the CLI) resumes from step 2, never from the partial one.
    cli = subprocess.run(
        [sys.executable, "-m", "orion_mllm.cli", "train", str(RECIPES / "stage2_pretrain.yaml"),
         "--output", str(run), f"data_root={shapes_root}", "shapes_data=", "train.global_batch_size=8",
         "train.micro_batch_size=4", f"model.init={base_dir}", f"teacher={base_dir}", "max_steps=4",
         "checkpoint.every=2", "train.log_every=1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "resumed from" in cli.stdout and "step_00000002" in cli.stdout
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2, 3]
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4]

    straight = Trainer(recipe, tmp_path / "straight", tensorboard=False).run()
    assert losses(run) == losses(straight.run_dir)


def test_resumes_a_checkpoint_written_before_the_run_loop(tmp_path, capsys, monkeypatch):
    """``fixtures/resume_9d20f6c/warmup``: a run stopped after its step-2 checkpoint by the code of
    commit 9d20f6c (before ``RunLoop`` / ``RunRecipe``). Today's trainer resumes it where it stopped,
    steps 2-3 give that code's uninterrupted losses (the recipe keys added since then at their defaults
    are no change), and its own checkpoints have the same format."""
    import random

    from orion_mllm.data import templates
    from orion_mllm.data.shapes import datasets

    # The data that run trained on: ShapesWorld's requests of the time (no caption style yet) and its
    # hold-out of the time (colour-shape pairs).
    old_templates = templates.POLITE + templates.COMMAND + templates.QUESTION

    def old_prompt(caption: str, rng: random.Random) -> str:
        caption = caption.strip().rstrip(".")
        return rng.choice(old_templates).format(caption=caption[0].lower() + caption[1:])

    monkeypatch.setattr(datasets, "generation_prompt", old_prompt)
    shapes_root = tmp_path / "data"
    write_shapes_dataset(
        shapes_root, size=48, n_und=40, n_gen=40, n_edit=16, n_interleaved=0, n_heldout=0, holdout="pairs",
        progress=False,
    )  # fmt: skip
    fixture = FIXTURES / "resume_9d20f6c"
    run = tmp_path / "warmup"
    shutil.copytree(fixture / "warmup", run)
    recipe = micro_recipe(
        "stage1_warmup.yaml", shapes_root, "shapes_data=", "model.init=preset:micro", "model.mlp_ratio=2",
        "max_steps=4", "checkpoint.every=2",
    )  # fmt: skip
    Trainer(recipe, run, tensorboard=False).run()
    assert "resumed from" in capsys.readouterr().out
    want = json.loads((fixture / "expected.json").read_text())["warmup_losses"]
    got = losses(run)
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2, 3]
    assert got[:2] == want[:2]  # the fixture's own lines
    # Recomputed here: bitwise equal on the machine that wrote the fixture; another CPU may round a
    # little differently, while a wrong resume (weights, optimizer, RNG or data position) is far off.
    assert got[2:] == pytest.approx(want[2:], rel=1e-5)
    old = checkpoint_format(fixture / "warmup/checkpoints/step_00000002")
    # The recipe a checkpoint carries has gained exactly the keys added to the recipe since 9d20f6c
    # (issue 16: token-space guidance and its training options, the stage-0 merger switch and tower
    # pre-training, the CE's answer weighting, the edit-source skip); the rest of the format is unchanged.
    old["trainer_state"]["recipe"]["guidance"] = "float"
    old["trainer_state"]["recipe"]["trainable"]["merger"] = "bool"
    old["trainer_state"]["recipe"]["model"]["tower_pretrain"] = "NoneType"
    old["trainer_state"]["recipe"]["model"]["source_skip"] = "bool"
    old["trainer_state"]["recipe"]["train"].update(
        visual_input_noise_schedule="str", mse_normalize="bool", prompt_dropout="float", ce_weighting="str"
    )
    for entry in old["trainer_state"]["recipe"]["data"]:  # and each data entry its question-type selection
        entry["qtypes"] = "NoneType"  # and whether its pictures are regressed (regress_images, session 14)
        entry["regress_images"] = "bool"
    assert checkpoint_format(ckpt.checkpoint_dir(run, 4)) == old


def test_recipe_keys_added_since_a_run_count_as_their_defaults_on_resume():
    """A key the saved recipe lacks (added to the schema later) is no change at its default, a change
    at any other value; without the schema every missing key is a change."""
    state = FIXTURES / "resume_9d20f6c/warmup/checkpoints/step_00000002/trainer_state.json"
    saved = json.loads(state.read_text())["recipe"]
    current = Recipe.model_validate(saved).model_dump(mode="json")
    assert recipe_changes(saved, current, Recipe) == []
    assert "guidance" in recipe_changes(saved, current)
    current["guidance"], current["train"]["prompt_dropout"] = 2.0, 0.1
    assert recipe_changes(saved, current, Recipe) == ["guidance", "train.prompt_dropout"]
    # Inside a data entry too (the entries are compared one by one, by position).
    assert "qtypes" not in saved["data"][0]
    current["data"][0]["qtypes"] = ["mcq"]
    assert recipe_changes(saved, current, Recipe) == ["data.0.qtypes", "guidance", "train.prompt_dropout"]


def test_incomplete_checkpoint_is_never_loaded(tmp_path, micro_model):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000009").mkdir(parents=True)
    assert ckpt.latest_checkpoint(run) is None
    opt = torch.optim.AdamW(micro_model.vision_head.parameters())
    from orion_mllm.train.distributed import init_distributed

    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(run / "checkpoints" / "step_00000009", micro_model, opt, init_distributed("cpu"))


# ------------------------------------------------------------------ distributed


def test_two_process_fsdp_matches_one_process(tmp_path, shapes_root, base_dir):
    overrides = [
        f"data_root={shapes_root}", "train.global_batch_size=8", "train.micro_batch_size=4",
        f"model.init={base_dir}", f"teacher={base_dir}", "max_steps=3", "checkpoint.every=2",
        # Input noise is drawn per process: with it, 2 processes train the same distribution, not the
        # same numbers (README). The equality checked here is the FSDP arithmetic.
        "train.visual_input_noise=0",
        "shapes_data=",  # the test's own smaller folder, not the recipe's data
    ]  # fmt: skip
    one = Trainer(_pretrain(shapes_root, base_dir, *overrides[4:]), tmp_path / "one", tensorboard=False).run()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "orion_mllm.cli", "train", str(RECIPES / "stage2_pretrain.yaml"),
         "--nproc", "2", "--output", str(tmp_path / "two"), *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "finished"
    a, b = losses(one.run_dir), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    # The FSDP run exported a loadable model of the same architecture.
    OrionModel.from_pretrained(tmp_path / "two" / "final")


# ------------------------------------------------------------------ freezing


def test_warmup_changes_only_the_head(tmp_path, shapes_root, base_dir):
    recipe = micro_recipe("stage1_warmup.yaml", shapes_root, f"model.init={base_dir}", "max_steps=3")
    result = Trainer(recipe, tmp_path / "warm", tensorboard=False).run()
    before, after = _weights(base_dir), _weights(result.final_model)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(HEAD_WEIGHTS_NAME) for k in changed), sorted(changed)[:5]
    m = read_metrics(result.run_dir)
    assert all(r["ce"] is None and r["kl"] is None and r["mse"] > 0 for r in m)
    # Stage 1 records its start as the KL teacher for the stages after it.
    assert json.loads((result.run_dir / "run.json").read_text())["teacher"] == str(base_dir.resolve())


def test_pretrain_keeps_vision_tower_frozen(tmp_path, shapes_root, base_dir):
    result = Trainer(
        _pretrain(shapes_root, base_dir, "max_steps=2"), tmp_path / "pre", tensorboard=False
    ).run()
    before, after = _weights(base_dir), _weights(result.final_model)
    visual = [k for k in before if ":visual." in k]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    llm = [k for k in before if ":model.layers" in k or "language_model.layers" in k]
    assert any(not torch.equal(before[k], after[k]) for k in llm)


# ------------------------------------------------------------------ anomalies


def _poison_forward(monkeypatch, bad_steps):
    """Make the loss NaN on the given optimizer steps (counted by forward calls per step)."""
    calls = {"step": -1}
    orig = OrionModel.forward

    def forward(self, batch, weights, teacher=None, **kw):
        out = orig(self, batch, weights, teacher, **kw)
        if calls["step"] in bad_steps:
            out.terms.ce = out.terms.ce * float("nan")
        return out

    monkeypatch.setattr(OrionModel, "forward", forward)
    return calls


def test_nan_batch_is_skipped_and_counted(tmp_path, shapes_root, base_dir, monkeypatch):
    calls = _poison_forward(monkeypatch, {2})
    recipe = _pretrain(shapes_root, base_dir, "max_steps=4")
    trainer = Trainer(recipe, tmp_path / "run", tensorboard=False)
    snapshots = []

    def before_step(t, step, rec):
        calls["step"] = step + 1  # the next step's forwards see this
        snapshots.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})

    calls["step"] = 0
    trainer.callbacks.append(before_step)
    trainer.run()
    m = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in m] == [False, False, True, False]
    assert m[2]["loss"] is None  # NaN is written as null in metrics.jsonl
    assert m[2]["skipped_steps"] == 1 and m[3]["skipped_steps"] == 1
    # The skipped step changed no weight.
    for k, v in snapshots[1].items():
        assert torch.equal(v, snapshots[2][k]), k


def test_consecutive_anomalies_abort(tmp_path, shapes_root, base_dir, monkeypatch):
    calls = _poison_forward(monkeypatch, {0, 1, 2, 3, 4, 5})
    calls["step"] = 0
    recipe = _pretrain(shapes_root, base_dir, "max_steps=6", "anomaly.max_consecutive=3")
    trainer = Trainer(recipe, tmp_path / "run", tensorboard=False)
    trainer.callbacks.append(lambda t, step, rec: calls.update(step=step + 1))
    with pytest.raises(TrainingDiverged, match=r"3 anomalous steps in a row at step 2 \(last: loss is nan\)"):
        trainer.run()


# ------------------------------------------------------------------ bad data


def _bad_dataset(tmp_path: Path, shapes_root: Path, n_good: int, n_bad_each: int) -> Path:
    """und records from ShapesWorld plus corrupt PNGs, missing files and malformed JSON lines."""
    out = tmp_path / "bad"
    out.mkdir()
    lines = (shapes_root / "und.jsonl").read_text().splitlines()[:n_good]
    good = [json.loads(x) for x in lines]
    shutil.copytree(shapes_root / "images", out / "images")
    rows = [json.dumps(r) for r in good]
    for i in range(n_bad_each):
        (out / f"corrupt_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
        corrupt = json.loads(json.dumps(good[i]))
        missing = json.loads(json.dumps(good[i]))
        _replace_image(corrupt, f"corrupt_{i}.png")
        _replace_image(missing, f"does_not_exist_{i}.png")
        rows += [json.dumps(corrupt), json.dumps(missing), '{"messages": [ this is not json']
    (out / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    return out


def _replace_image(record, name):
    """Point the record's first image at ``name`` (whichever record format it uses)."""
    text = json.dumps(record)
    import re

    first = re.search(r'images/[^"]+\.png', text).group(0)
    record.clear()
    record.update(json.loads(text.replace(first, name, 1)))


def test_bad_records_are_skipped_counted_and_logged(tmp_path, shapes_root):
    data = _bad_dataset(tmp_path, shapes_root, n_good=21, n_bad_each=1)  # 24 records: 3 bad
    recipe = micro_recipe(
        "stage0_base.yaml", data, "data=[{name: mixed, path: mixed.jsonl, task: understanding, weight: 1}]",
        "shapes_data=", "train.epochs=1", "train.max_bad_sample_share=0.5",
    )  # fmt: skip
    result = Trainer(recipe, tmp_path / "run", tensorboard=False).run()
    assert result.steps == 3 and result.skipped_samples == 3
    logged = [json.loads(x) for x in (result.run_dir / "skipped_samples.jsonl").read_text().splitlines()]
    reasons = " | ".join(f"{x['source']}: {x['reason']}" for x in logged)
    assert len(logged) == 3, reasons
    assert "corrupt_0.png" in reasons and "does_not_exist_0.png" in reasons and "not valid JSON" in reasons
    assert "mixed.jsonl:24" in reasons  # the malformed line, by file and line number
    m = read_metrics(result.run_dir)
    assert sum(r["samples"] for r in m) == 21 and m[-1]["skipped_samples"] == 3


def test_too_many_bad_records_stop_the_run(tmp_path, shapes_root):
    data = _bad_dataset(tmp_path, shapes_root, n_good=30, n_bad_each=10)  # 60 records: 30 bad
    recipe = micro_recipe(
        "stage0_base.yaml", data, "data=[{name: mixed, path: mixed.jsonl, task: understanding, weight: 1}]",
        "shapes_data=",
    )  # fmt: skip
    with pytest.raises(
        DataQualityError, match=r"could not be read.*max_bad_sample_share=0.01.*corrupt_|does_not"
    ):
        Trainer(recipe, tmp_path / "run", tensorboard=False).run()


# ------------------------------------------------------------------ end to end


def test_micro_stages_0_to_3_end_to_end(tmp_path, shapes_root):
    """stage0 -> 1 -> 2 -> 3 chained through init=previous; every stage's trained losses fall."""
    runs = tmp_path / "runs"
    plan = [("stage0_base", 30), ("stage1_warmup", 25), ("stage2_pretrain", 25), ("stage3_sft", 20)]
    results = {}
    for stem, steps in plan:
        recipe = micro_recipe(
            f"{stem}.yaml",
            shapes_root,
            f"max_steps={steps}",
            "train.global_batch_size=16",
            "train.epochs=100",
            # Over 20-25 steps the noisy-input MSE is too noisy to show a trend; the chain is the point.
            *(["train.visual_input_noise=0"] if stem != "stage0_base" else []),
        )
        results[stem] = Trainer(recipe, runs / stem, tensorboard=False).run()

    def falls(run, key):
        vals = [r[key] for r in read_metrics(run.run_dir)]
        k = max(2, len(vals) // 5)
        first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
        return last < first, (first, last)

    for stem, keys in [("stage0_base", ["ce"]), ("stage1_warmup", ["mse"]),
                       ("stage2_pretrain", ["ce", "mse"]), ("stage3_sft", ["ce", "mse"])]:  # fmt: skip
        for key in keys:
            ok, nums = falls(results[stem], key)
            assert ok, f"{stem} {key} did not fall: first {nums[0]:.4g} -> last {nums[1]:.4g}"
    # KL starts at 0 (student == teacher) and must stay small under its 0.01 weight.
    kl = [r["kl"] for r in read_metrics(results["stage2_pretrain"].run_dir)]
    assert kl[0] < 1e-6 and max(kl) < 1.0
    # The teacher of stages 2 and 3 is the stage-0 base, not the previous stage's output.
    base = str((runs / "stage0_base" / "final").resolve())
    for stem in ("stage1_warmup", "stage2_pretrain", "stage3_sft"):
        assert json.loads((runs / stem / "run.json").read_text())["teacher"] == base
    model = OrionModel.from_pretrained(results["stage3_sft"].final_model)
    assert model.config.image_spec.gen_image_size == 48
    # Re-running a finished stage does nothing (and says so) instead of training again.
    stage0 = micro_recipe(
        "stage0_base.yaml", shapes_root, "max_steps=30", "train.global_batch_size=16", "train.epochs=100"
    )
    again = Trainer(stage0, runs / "stage0_base", tensorboard=False).run()
    assert again.steps == 30 and len(read_metrics(runs / "stage0_base")) == 30


def test_activation_checkpointing_gives_the_same_losses(tmp_path, shapes_root, base_dir):
    plain = Trainer(_pretrain(shapes_root, base_dir, "max_steps=2"), tmp_path / "a", tensorboard=False).run()
    ac = _pretrain(shapes_root, base_dir, "max_steps=2", "train.activation_checkpointing=true")
    wrapped = Trainer(ac, tmp_path / "b", tensorboard=False).run()
    for x, y in zip(losses(plain.run_dir), losses(wrapped.run_dir), strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)
    a, b = _weights(plain.final_model), _weights(wrapped.final_model)
    assert a.keys() == b.keys()  # the export has plain parameter names
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


class _Stop(Exception):
    pass


def _stop_after(step_index):
    def cb(trainer, step, rec):
        if step == step_index:
            raise _Stop

    return cb


def test_resume_refuses_a_changed_recipe(tmp_path, shapes_root, base_dir):
    recipe = _pretrain(shapes_root, base_dir, "max_steps=4", "checkpoint.every=2")
    with pytest.raises(_Stop):
        Trainer(recipe, tmp_path / "run", callbacks=[_stop_after(2)], tensorboard=False).run()
    changed = _pretrain(shapes_root, base_dir, "max_steps=4", "checkpoint.every=2", "optim.max_lr=0.01")
    with pytest.raises(ValueError, match=r"different recipe \(optim\.max_lr changed\)"):
        Trainer(changed, tmp_path / "run", tensorboard=False).run()
    # Watching/checkpointing settings may change; the run then resumes where it was.
    relaxed = _pretrain(shapes_root, base_dir, "max_steps=4", "checkpoint.every=3", "train.log_every=2")
    result = Trainer(relaxed, tmp_path / "run", tensorboard=False).run()
    assert [m["step"] for m in read_metrics(result.run_dir)] == [0, 1, 2, 3]
    assert [m["lr"] for m in read_metrics(result.run_dir)] == pytest.approx(
        [m["lr"] for m in read_metrics(Trainer(recipe, tmp_path / "ref", tensorboard=False).run().run_dir)]
    )


def test_bad_sample_log_has_no_duplicates_after_resume(tmp_path, shapes_root):
    data = _bad_dataset(tmp_path, shapes_root, n_good=21, n_bad_each=1)
    mixed = "data=[{name: mixed, path: mixed.jsonl, task: understanding, weight: 1}]"
    args = ("stage0_base.yaml", data, mixed, "shapes_data=", "train.epochs=1",
            "train.max_bad_sample_share=0.5", "checkpoint.every=2")  # fmt: skip
    with pytest.raises(_Stop):  # step 3 ran and logged its bad samples, but was never checkpointed
        Trainer(micro_recipe(*args), tmp_path / "run", callbacks=[_stop_after(2)], tensorboard=False).run()
    result = Trainer(micro_recipe(*args), tmp_path / "run", tensorboard=False).run()
    lines = (result.run_dir / "skipped_samples.jsonl").read_text().splitlines()
    assert len(lines) == result.skipped_samples == 3, lines


def test_records_with_wrong_types_or_bomb_images_are_bad_samples(tmp_path, micro_model):
    from PIL import Image

    from orion_mllm.data.entries import DatasetEntry
    from orion_mllm.data.mixture import MixtureSampler
    from orion_mllm.data.sources import open_dataset
    from orion_mllm.train.batches import BadSample, StepLoader

    big = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(big)
    raw = bytearray(big.read_bytes())
    raw[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width/height: a 900-megapixel claim
    big.write_bytes(bytes(raw))
    recs = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": 7}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "b"}],
         "images": [str(big)]},
        {"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "c"}],
         "images": [str(tmp_path)]},
    ]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = open_dataset(DatasetEntry(name="d", path="d.jsonl", task="understanding", weight=1), tmp_path)
    loader = StepLoader(
        [src], MixtureSampler([3], [1.0], seed=0), micro_model.sequence_builder(), global_batch_size=3,
        rank=0, world_size=1, packing=True, pack_tokens=512, micro_batch_size=2, pad_token_id=0,
    )  # fmt: skip
    outs = [loader.encode(0, i) for i in range(3)]
    assert all(isinstance(o, BadSample) for o in outs), outs
    reasons = " | ".join(o.reason for o in outs)
    assert "got int" in reasons and "cannot read image" in reasons and "is a directory" in reasons


def test_a_data_entrys_regress_images_reaches_the_step(tmp_path, micro_model, images):
    """``regress_images: false`` on one data entry: its assistant pictures give the step no visual
    targets (no MSE / KL / noise), the other entry's still do, and the recipe validates the key."""
    from orion_mllm.data.entries import DatasetEntry
    from orion_mllm.data.mixture import MixtureSampler
    from orion_mllm.data.sources import open_dataset
    from orion_mllm.train.batches import StepLoader

    images["red_circle"].save(tmp_path / "c.png")
    record = {
        "conversations": [
            {"from": "human", "value": "Make a picture of some shapes."}, {"from": "gpt", "value": "<image>"},
            {"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "1"},
        ],
        "image": "c.png",
    }  # fmt: skip
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    entries = [
        DatasetEntry(name="kept", path="d.jsonl", task="mixed", weight=1),
        DatasetEntry(name="context", path="d.jsonl", task="mixed", weight=1, regress_images=False),
    ]
    sources = [open_dataset(e, tmp_path) for e in entries]
    loader = StepLoader(
        sources, MixtureSampler([1, 1], [1.0, 1.0], seed=0), micro_model.sequence_builder(),
        global_batch_size=2, rank=0, world_size=1, packing=False, pack_tokens=512, micro_batch_size=1,
        pad_token_id=0,
        regress_images=[e.regress_images for e in entries],
    )  # fmt: skip
    n = micro_model.config.image_spec.gen_num_tokens
    assert loader.encode(0, 0).visual_positions.numel() == n
    assert loader.encode(1, 0).visual_positions.numel() == 0
    with pytest.raises(ValueError, match="regress_images"):
        DatasetEntry(name="x", path="d.jsonl", task="mixed", weight=1, regress_images="sometimes")
    with pytest.raises(ValueError, match="2 flags for 1 datasets"):
        StepLoader(
            sources[:1], MixtureSampler([1], [1.0], seed=0), micro_model.sequence_builder(),
            global_batch_size=1, rank=0, world_size=1, packing=False, pack_tokens=512, micro_batch_size=1,
            pad_token_id=0,
            regress_images=[True, False],
        )  # fmt: skip


# ------------------------------------------------------------------ MSE in units of the targets' variance


def test_mse_normalize_divides_the_mse_weight_by_the_target_variance(tmp_path, shapes_root, base_dir):
    from orion_mllm.data.records import encode_record
    from orion_mllm.sequence import attach_visual_tokens
    from orion_mllm.train.batches import StepLoader, open_mixture
    from orion_mllm.train.distributed import DistState
    from orion_mllm.train.token_stats import target_token_variance

    recipe = _pretrain(shapes_root, base_dir, "max_steps=2", "train.mse_normalize=true")
    lines: list[str] = []
    trainer = Trainer(recipe, tmp_path / "run", tensorboard=False)
    trainer._log = lines.append
    trainer.run()
    logged = [line for line in lines if "units of the targets' variance" in line]
    assert len(logged) == 1, lines

    # The number by hand: every generated image the first steps read, per-dimension variance, averaged.
    model = OrionModel.from_pretrained(base_dir)
    sources, sampler = open_mixture(recipe)
    loader = StepLoader(sources, sampler, model.sequence_builder(), global_batch_size=8, rank=0, world_size=1,
                        packing=False, pack_tokens=512, micro_batch_size=4, pad_token_id=0)  # fmt: skip
    var, images = target_token_variance(model, loader, DistState(0, 0, 1, torch.device("cpu")), min_images=8)
    targets = []
    for step in range(16):
        for dataset, index in loader.positions(step):
            raw = sources[dataset].get(index)
            enc = encode_record(model.sequence_builder(), raw.record)
            enc = attach_visual_tokens(enc, model.encode_images)
            if enc.image_is_target.any():
                targets.append(enc.visual_tokens[enc.visual_target_index.unique()])
        if len(targets) >= 8:
            break
    by_hand = torch.cat(targets).double().var(0, unbiased=False).mean().item()
    assert images == len(targets)
    assert var == pytest.approx(by_hand, rel=1e-6)
    default_var, _ = target_token_variance(model, loader, DistState(0, 0, 1, torch.device("cpu")))
    assert trainer.weights.mse == pytest.approx(recipe.loss.mse / default_var, rel=1e-9)
    assert f"effective MSE weight {trainer.weights.mse:.4g}" in logged[0]
