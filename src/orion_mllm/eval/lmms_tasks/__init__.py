"""lmms-eval tasks shipped with orion-mllm (``shapes_und``: ShapesWorld understanding from a local
folder). ``orion eval lmms`` always adds this folder to the harness's ``--include_path``; with plain
``lmms-eval``, pass ``--include_path`` this folder (``python -c "from orion_mllm.eval.lmms_tasks import
TASKS_DIR; print(TASKS_DIR)"``)."""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
