"""The committed decoder (bases/PRESET/decoder): its network without the coarse map, refitted at quickstart
time to the trained decoder, checked against the tree's recipe and the base it was trained on, used by the
quickstart with the committed base, trained there when it does not match, and left out by --from-scratch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orion_mllm.decoder.model import COARSE_KEYS, DECODER_CONFIG, NETWORK_WEIGHTS, OrionDecoder
from orion_mllm.train.setup import SetupError
from orion_mllm.workflow.committed_base import (
    MAX_BYTES,
    BaseMismatch,
    build_base,
    committed_base,
    folder_bytes,
    install_base,
)
from orion_mllm.workflow.committed_decoder import (
    build_decoder,
    check_decoder,
    committed_decoder,
    file_sha256,
)
from orion_mllm.workflow.quickstart import Quickstart, recipe_path
from orion_mllm.workflow.train_stage import train_stage

CAP = ["train.max_steps=4"]  # the quickstart's smoke cap (--max-steps 4) for both the base and the decoder


def test_the_committed_tiny_decoder_matches_its_recipe_and_base_and_is_small():
    base = committed_base("tiny")
    folder = committed_decoder("tiny")
    assert base is not None and folder is not None, "python scripts/build_decoder.py --preset tiny"
    provenance = check_decoder(folder, recipe_path("tiny", "decoder"), [], base / "final")
    assert provenance["command"].startswith("python scripts/build_decoder.py")
    assert provenance["steps"] > 0 and provenance["wall_seconds"] > 0
    assert folder_bytes(base) <= MAX_BYTES  # the base and its decoder together
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights == [folder / "final" / NETWORK_WEIGHTS]
    assert not set(load_file(weights[0])) & set(COARSE_KEYS)
    config = _config(folder)
    assert config.coarse_rank > 0  # the quickstart fits the map the network was trained with
    OrionDecoder(config).load_network(weights[0])  # every network weight of the config, none missing


def _config(folder: Path):
    from orion_mllm.decoder.model import DecoderConfig

    return DecoderConfig.from_dict(json.loads((folder / "final" / DECODER_CONFIG).read_text()))


@pytest.fixture(scope="module")
def micro_bases(tmp_path_factory) -> tuple[Path, Path]:
    """(bases root, build work dir): a micro base and its decoder built by the same code as bases/tiny,
    with the quickstart's smoke cap; the work dir keeps the trained decoder."""
    root = tmp_path_factory.mktemp("bases")
    build_base(
        [recipe_path("micro", "stage0_base")], root / "micro", tmp_path_factory.mktemp("b"), CAP, "test"
    )
    work = tmp_path_factory.mktemp("d")
    build_decoder(
        recipe_path("micro", "decoder"), root / "micro", root / "micro" / "decoder", work, CAP, "test"
    )
    return root, work


def _states(a: Path, b: Path) -> tuple[dict, dict]:
    return load_file(a / "decoder.safetensors"), load_file(b / "decoder.safetensors")


def test_the_refitted_decoder_is_the_trained_one(micro_bases, tmp_path):
    root, work = micro_bases
    folder = committed_decoder("micro", root)
    assert folder is not None
    kept = load_file(folder / "final" / NETWORK_WEIGHTS)
    assert not set(kept) & set(COARSE_KEYS)
    install_base(root / "micro", tmp_path / "stage0_base")
    data = f"data_root={tmp_path / 'data'}"
    final = train_stage(
        recipe_path("micro", "decoder"), tmp_path / "decoder", [*CAP, data], network=folder / "final"
    )
    trained, refit = _states(work / "decoder" / "final", final)
    assert set(trained) == set(refit) and set(COARSE_KEYS) <= set(refit)
    for key in trained:  # same images, same tower, same closed form: the same map
        torch.testing.assert_close(refit[key], trained[key], rtol=1e-5, atol=1e-6, msg=key)
    assert trained["coarse_in.weight"].abs().sum() > 0  # the map was fitted, not left at zero
    run = json.loads((tmp_path / "decoder" / "run.json").read_text())
    assert run["status"] == "finished" and run["network"] == str((folder / "final").resolve())
    assert not (tmp_path / "decoder" / "checkpoints").exists()  # nothing trained
    # Both render the same picture from the same tokens.
    tokens = torch.randn(1, _config(folder).num_tokens, _config(folder).token_dim)
    a = OrionDecoder.from_pretrained(work / "decoder" / "final").coarse_latents(tokens)
    b = OrionDecoder.from_pretrained(final).coarse_latents(tokens)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_network_of_another_config_or_with_missing_weights_is_refused(micro_bases, tmp_path):
    root, _ = micro_bases
    net = tmp_path / "net"
    shutil.copytree(root / "micro" / "decoder" / "final", net)
    config = json.loads((net / DECODER_CONFIG).read_text())
    install_base(root / "micro", tmp_path / "stage0_base")
    overrides = [*CAP, f"data_root={tmp_path / 'data'}"]
    for key, value in (("coarse_rank", 128), ("extra.cfg_scale", 9.0)):
        changed = json.loads(json.dumps(config))
        if key.startswith("extra."):
            changed["extra"][key.removeprefix("extra.")] = value
        else:
            changed[key] = value
        (net / DECODER_CONFIG).write_text(json.dumps(changed))
        with pytest.raises(SetupError, match=rf"differs at {key}\)"):
            train_stage(recipe_path("micro", "decoder"), tmp_path / "a", overrides, network=net)
    (net / DECODER_CONFIG).write_text(json.dumps(config))
    state = load_file(net / NETWORK_WEIGHTS)
    dropped = sorted(state)[0]
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if k != dropped}, net / NETWORK_WEIGHTS)
    with pytest.raises(ValueError, match=f"missing.*{dropped}"):
        train_stage(recipe_path("micro", "decoder"), tmp_path / "b", overrides, network=net)
    with pytest.raises(ValueError, match="only by a decoder recipe"):
        train_stage(recipe_path("micro", "stage1_warmup"), tmp_path / "c", overrides, network=net)


def test_check_names_the_recipe_key_and_the_base(micro_bases, tmp_path):
    root, _ = micro_bases
    folder = root / "micro" / "decoder"
    recipe = recipe_path("micro", "decoder")
    base_model = root / "micro" / "final"
    assert check_decoder(folder, recipe, CAP, base_model)["base_sha256"] == file_sha256(
        base_model / "model.safetensors"
    )
    assert check_decoder(folder, recipe, [*CAP, "data_root=/elsewhere"], base_model)  # where data is written
    with pytest.raises(BaseMismatch, match=r"train\.max_steps"):
        check_decoder(folder, recipe, ["train.max_steps=3"], base_model)
    with pytest.raises(BaseMismatch, match=r"decoder\.cfg_scale"):
        check_decoder(folder, recipe, [*CAP, "decoder.cfg_scale=3.0"], base_model)
    other = tmp_path / "other"
    shutil.copytree(base_model, other)
    weights = load_file(other / "model.safetensors")
    key = sorted(weights)[0]
    weights[key] = weights[key] + 1
    from safetensors.torch import save_file

    save_file(weights, other / "model.safetensors")
    with pytest.raises(BaseMismatch, match="another base"):
        check_decoder(folder, recipe, CAP, other)


def test_quickstart_uses_a_matching_committed_decoder(micro_bases, tmp_path):
    root, _ = micro_bases
    logs: list[str] = []
    qs = Quickstart(
        "micro", tmp_path / "qs", max_steps=4, eval_limit=6, progress=False, bases=root, log=logs.append
    )
    assert qs.base_decoder == root / "micro" / "decoder"
    qs.run_until(("stage0_base", "decoder"))
    run = json.loads((tmp_path / "qs" / "decoder" / "run.json").read_text())
    assert run["network"] == str((root / "micro" / "decoder" / "final").resolve())
    assert any("using the committed decoder" in line for line in logs)
    assert set(COARSE_KEYS) <= set(load_file(tmp_path / "qs" / "decoder" / "final" / "decoder.safetensors"))


def test_quickstart_trains_a_decoder_that_does_not_match_and_from_scratch_trains_it(micro_bases, tmp_path):
    root, _ = micro_bases
    bases = tmp_path / "bases"
    shutil.copytree(root, bases)
    provenance_file = bases / "micro" / "decoder" / "provenance.json"
    provenance = json.loads(provenance_file.read_text())
    provenance["recipe"]["decoder"]["cfg_scale"] = 1.5  # as if the tree's recipe changed since the build
    provenance_file.write_text(json.dumps(provenance))
    logs: list[str] = []
    qs = Quickstart(
        "micro", tmp_path / "a", max_steps=4, eval_limit=6, progress=False, bases=bases, log=logs.append
    )
    qs.run_until(("stage0_base", "decoder"))
    run = json.loads((tmp_path / "a" / "decoder" / "run.json").read_text())
    assert "network" not in run and run["steps"] == 4
    assert any("not using the committed decoder" in line and "decoder.cfg_scale" in line for line in logs)
    fresh = Quickstart("micro", tmp_path / "b", max_steps=4, progress=False, bases=root, from_scratch=True)
    assert fresh.base is None and fresh.base_decoder is None
