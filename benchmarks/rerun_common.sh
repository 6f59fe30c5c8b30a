# Shared by benchmarks/stage3_rerun.sh and stage_seed_rerun.sh (sourced): the model folder a rerun
# evaluates, and the order its understanding questions are asked in.

# assemble_model MODEL STAGE3_FINAL DECODER: MODEL = stage 3's export + the decoder in decoder/ (kept
# when already there, so a rerun resumes).
assemble_model() {
  if [ ! -d "$1/decoder" ]; then
    rm -rf "$1"; cp -r "$2" "$1"; cp -r "$3" "$1/decoder"
  fi
}

# question_first_flag DATA: "--question-first" when the ShapesWorld folder DATA (what the model trained
# on) asks its questions before the picture (shapes_data.question_first), so `orion eval shapes-und` asks
# the same way; else nothing.
question_first_flag() {
  ${PYTHON:-.venv/bin/python} - "$1" <<'PY'
import json, sys
from orion_mllm.data.shapes.datasets import recorded_settings
settings = recorded_settings(json.load(open(f"{sys.argv[1]}/meta.json"))) or {}
print("--question-first" if settings.get("question_first") else "")
PY
}
