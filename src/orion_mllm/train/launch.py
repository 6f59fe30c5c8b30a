"""One training stage as N processes on this machine: the same ``orion train`` command under torchrun.

``orion train RECIPE --nproc N`` checks the configuration once in the launching process (so a bad path
or mismatched data is reported once, not by every rank), then runs ``python -m torch.distributed.run
--standalone --nproc_per_node N -m orion_mllm.cli train RECIPE --output DIR [key=value ...]``: FSDP2
over N local processes (gloo on CPU, NCCL on GPU). Several nodes: call torchrun directly (README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from orion_mllm.train.recipe import Recipe


def under_torchrun() -> bool:
    """True inside a process that torchrun started (it sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def launch_local(
    recipe: Recipe,
    recipe_file: str | Path,
    output: str | Path,
    overrides: Sequence[str],
    *,
    nproc: int,
    debug: bool = False,
) -> int:
    """Preflight ``recipe``, then run its ``orion train`` command under torchrun with ``nproc``
    processes; returns torchrun's exit code (non-zero: a rank failed and printed why)."""
    from orion_mllm.train.trainer import preflight

    preflight(recipe, output)  # bad paths / data are reported once, here, not by every rank
    # The same command under torchrun: FSDP2 over N local processes (gloo on CPU, NCCL on GPU).
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "orion_mllm.cli",
        "train",
        str(recipe_file),
        "--output",
        str(output),
        *overrides,
    ]
    if debug:
        cmd.insert(cmd.index("train"), "--debug")
    return subprocess.call(cmd)
