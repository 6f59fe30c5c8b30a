# Editing alone, from a trained ORION model (issue 16): STEPS steps of the tiny stage-3 recipe on
# edit.jsonl only, then `orion eval shapes-edit` of the result with a quickstart's decoder. Measures how
# learnable each edit operation is from a given data folder (e.g. `add_layout: canonical` against
# `random`: benchmarks/SMALL_SCALE.md, session 13).
# Usage: bash benchmarks/edit_only_rerun.sh INIT DATA TEACHER DECODER EVAL_DATA OUT [STEPS]
#   INIT: model directory to start from; DATA: ShapesWorld folder (read as it is: shapes_data=null);
#   TEACHER: the KL teacher (the stage-0 base); DECODER: a decoder directory; EVAL_DATA: held-out set.
# Prints shapes-edit's JSON last.
set -euo pipefail
orion=${ORION:-.venv/bin/orion}
init=$(realpath "$1"); data=$(realpath "$2"); teacher=$(realpath "$3"); decoder=$4; eval_data=$5; out=$6
steps=${7:-600}
$orion train recipes/shapes/tiny/stage3_sft.yaml --output "$out/train" model.init="$init" teacher="$teacher" \
  data_root="$data" shapes_data=null "data=[{name: shapes_edit, path: edit.jsonl, task: editing, weight: 1.0}]" \
  train.max_steps="$steps" train.epochs=$(( steps * 32 / 2000 + 20 )) checkpoint.every=300
rm -rf "$out/model"; cp -r "$out/train/final" "$out/model"; cp -r "$decoder" "$out/model/decoder"
$orion eval shapes-edit --model "$out/model" --data "$eval_data" 2>/dev/null | tail -n 1 | tee "$out/edit.json"
