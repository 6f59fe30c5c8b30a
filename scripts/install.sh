#!/usr/bin/env bash
# Create .venv (if missing) and install orion-mllm into it with a torch build that fits this machine.
#
# - A torch already importable in the venv is kept as is (GPU users bring their CUDA build).
# - With an NVIDIA GPU (nvidia-smi answers) pip's default torch, a CUDA build, is installed.
# - Otherwise the CPU build is asked for: torch==2.13.0 (on our CI machines its wheel lies on disk).
# Override with ORION_TORCH_SPEC, e.g. ORION_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ORION_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${ORION_TORCH_SPEC:-}" ]; then
    spec=$ORION_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.6"
  else
    spec="torch==2.13.0"
  fi
  echo "[install] installing $spec"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $spec
fi
echo "[install] installing orion-mllm (editable) with dev tools"
"${PIP[@]}" install -e ".[dev,eval-core]"
# lmms-eval for `orion eval lmms` and its tests, without its model zoo's dependencies (torchvision
# would replace the CPU torch with a CUDA build here): its core needs only the eval-core extra above.
# Users install it whole with `pip install 'orion-mllm[eval]'`.
if ! "$VENV/bin/python" -c "import lmms_eval" 2>/dev/null; then
  echo "[install] installing lmms-eval (core only)"
  "${PIP[@]}" install --no-deps "lmms-eval==0.7.3"
fi
"$VENV/bin/python" -c "import torch, transformers, orion_mllm; print(f'[install] torch {torch.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
