#!/usr/bin/env bash
# One-shot GPU check of orion-mllm, for a CUDA machine without network (run once, from the repo root):
#
#   bash benchmarks/gpu_check.sh                 # everything printed is also written to $OUT/gpu_check.log
#
# 0. installs the wheels the machine lacks from .whl/ (pydantic + pydantic-core + annotated-types +
#    typing-inspection + typing-extensions, liger-kernel; downloaded beforehand for CPython 3.12
#    manylinux x86_64) into $WORK/site, no index, no deps, and puts it and src/ on PYTHONPATH;
# 1. prints nvidia-smi and the torch / transformers / liger versions;
# a. GPU-marked tests (chunked KL on CUDA vs CPU, Liger KL vs reference), then tests/test_losses.py;
# b. a 5-step smoke run of each of the micro ShapesWorld stages 0, 1, 2 (bf16 autocast on CUDA; stage 2
#    has the KL term against its frozen teacher), each stage starting from the previous one;
# c. benchmarks/train_step.py (packed vs unpacked optimizer steps, tokens/s, MFU) for the tiny preset
#    and for the Qwen2.5-VL-3B architecture (random weights); their last-line JSON goes to
#    $OUT/train_step_tiny.json and $OUT/train_step_3b.json.
#
# Every part runs under `timeout` and the whole script under a deadline (GPU_CHECK_BUDGET seconds,
# default 470): a part that fails or times out is reported and the next one still runs; a part that
# no longer fits is skipped. The last line is a JSON summary of every part (name, rc, seconds).
#
# GPU_CHECK_DRY=1 rehearses the script on a CPU machine: the wheels are only checked (not installed:
# they are for Python 3.12), .venv/bin/python is used, benchmarks run on CPU, the 3B one is skipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SELF="$PWD/benchmarks/gpu_check.sh"
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET:-470}"
WORK="${GPU_CHECK_WORK:-/tmp}"
START=$(date +%s)
SUMMARY=()

log_file=/dev/null
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    log_file="$OUT/gpu_check.log"
fi

banner() { printf '\n===== %s (t=%ss)\n' "$*" "$(($(date +%s) - START))"; }

# part NAME TIMEOUT CMD...: run CMD under `timeout`, capped by what is left of the budget; never exits.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 5))
    ((limit > left)) && limit=$left
    banner "$name (timeout ${limit}s)"
    if ((limit < 20)); then
        echo "SKIPPED: only ${left}s of the ${BUDGET}s budget left"
        SUMMARY+=("{\"part\": \"$name\", \"rc\": null, \"status\": \"skipped\", \"seconds\": 0}")
        return 0
    fi
    local t0 rc status
    t0=$(date +%s)
    # Through this script again (`__run FUNCTION ...`): `timeout` can only run programs, not functions.
    if timeout --kill-after=15 "$limit" bash "$SELF" __run "$@"; then rc=0; else rc=$?; fi
    status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    echo "----- $name: $status (rc=$rc, $(($(date +%s) - t0))s)"
    SUMMARY+=("{\"part\": \"$name\", \"rc\": $rc, \"status\": \"$status\", \"seconds\": $(($(date +%s) - t0))}")
    return 0
}

# bench TAG ARGS...: benchmarks/train_step.py, its last line (the JSON) kept as $OUT/train_step_TAG.json.
bench() {
    local tag=$1
    shift
    local out="$WORK/train_step_$tag.out"
    "$PY" benchmarks/train_step.py "$@" 2>&1 | tee "$out" # pipefail: fails when the benchmark does
    if [[ -n "${OUT:-}" ]]; then
        tail -n 1 "$out" >"$OUT/train_step_$tag.json"
    fi
}

# Any program, e.g. "$PY" -m pytest ...
run() { "$@"; }

train_smoke() {
    local runs="$WORK/gpu_runs" data="$WORK/gpu_data" stage
    rm -rf "$runs" "$data"
    for stage in stage0_base stage1_warmup stage2_pretrain; do
        banner "train micro $stage"
        "$PY" -m orion_mllm.cli train "recipes/shapes/micro/$stage.yaml" --output "$runs/$stage" \
            "data_root=$data" max_steps=5 || return $?
        # What the trainer logged, so the log shows loss, tokens/s and padding for each stage.
        tail -n 2 "$runs/$stage"/metrics.jsonl 2>/dev/null || true
    done
}

main() {
    banner "setup"
    echo "repo: $PWD  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')  dry: $DRY  budget: ${BUDGET}s"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    local wheels=(.whl/*.whl)
    [[ -e "${wheels[0]}" ]] || { echo "no wheels in .whl/: download them first (see this script's header)"; exit 2; }
    ls -l "${wheels[@]}"
    if [[ "$DRY" == 1 ]]; then
        PY=.venv/bin/python
        for w in "${wheels[@]}"; do "$PY" -m zipfile -t "$w" >/dev/null && echo "ok: $w"; done
        export PYTHONPATH="$PWD/src"
        DEVICE=cpu
    else
        PY=python3
        rm -rf "$WORK/site"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "${wheels[@]}"; then
            echo "pip install failed; unpacking the wheels instead (a wheel is a zip of site-packages)"
            for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$WORK/site"; done
        fi
        export PYTHONPATH="$WORK/site:$PWD/src"
        DEVICE=cuda
        nvidia-smi || true
    fi
    "$PY" - <<'EOF'
import importlib, platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
for mod in ("pydantic", "liger_kernel", "triton", "orion_mllm"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'ok')} from {m.__file__}")
    except Exception as err:  # report and carry on
        print(f"{mod}: NOT importable ({type(err).__name__}: {err})")
from orion_mllm.losses import liger_available
print(f"liger_available(): {liger_available()}")
EOF

    export PY WORK DEVICE
    part "pytest -m gpu" 90 run "$PY" -m pytest -q -m gpu tests -x -p no:cacheprovider -rs
    part "pytest test_losses.py" 90 run "$PY" -m pytest -q tests/test_losses.py -p no:cacheprovider -rs
    part "train smoke micro stages 0-2" 150 train_smoke
    if [[ "$DRY" == 1 ]]; then
        part "train_step tiny" 240 bench tiny --preset tiny --device cpu --steps 1
        echo "(dry run: the qwen2.5-vl-3b benchmark needs a GPU; skipped)"
    else
        part "train_step tiny" 120 bench tiny --preset tiny --device "$DEVICE" --steps 3
        part "train_step qwen2.5-vl-3b" 300 bench 3b --preset qwen2.5-vl-3b --device "$DEVICE" --steps 2 \
            --global-batch 64 --pack-tokens 8192
        nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
    fi

    banner "summary"
    local joined
    joined=$(IFS=,; echo "${SUMMARY[*]}")
    echo "{\"gpu_check\": [$joined], \"dry\": $DRY, \"total_seconds\": $(($(date +%s) - START))}"
}

if [[ "${1:-}" == __run ]]; then # a part, run by `part` under `timeout`
    shift
    "$@"
    exit $?
fi
main "$@" 2>&1 | tee "$log_file"
