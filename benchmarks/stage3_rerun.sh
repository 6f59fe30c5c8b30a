# ORION's stage 3 of a finished tiny quickstart, retrained from that run's own stage-2 output with recipe
# overrides, then every user-facing score of the result: how a stage-3 recipe change moves drawing,
# understanding, editing and the answers about the model's own drawings (issue 16).
# Usage: bash benchmarks/stage3_rerun.sh QS NAME [KEY=VALUE ...]
#   QS: a finished `orion quickstart --preset tiny` folder; NAME: the run's folder under runs/stage3/;
#   KEY=VALUE: overrides of recipes/shapes/tiny/stage3_sft.yaml, as `orion train` takes them
#   (e.g. train.seed=1, 'data=[...]').
# INTERLEAVED=DIR (default runs/eval-inter300): an eval set with 300 draw-then-ask dialogues, written here on
# first use (seed and size of the quickstart's eval set), so interleaved accuracy is measured to +-0.03.
# RECIPE=FILE replaces the stage-3 recipe (default recipes/shapes/tiny/stage3_sft.yaml).
# Prints one JSON line per evaluation (shapes-gen with the unseen split, shapes-und on 1000 records,
# shapes-edit, interleaved) and a summary JSON last.
set -euo pipefail
orion=${ORION:-.venv/bin/orion}
py=${PYTHON:-.venv/bin/python}
qs=$(realpath "$1"); name=$2; shift 2
out=runs/stage3/$name
inter=${INTERLEAVED:-runs/eval-inter300}
recipe=${RECIPE:-recipes/shapes/tiny/stage3_sft.yaml}
data=$qs/data/shapes-tiny
mkdir -p "$out"
if [ ! -f "$inter/interleaved.jsonl" ]; then
  $py -c "import sys; from orion_mllm.eval.model_eval import eval_set; eval_set(sys.argv[1], size=64, n_interleaved=300)" "$inter"
fi
[ -d "$out/stage3_sft/final" ] || $orion train "$recipe" --output "$out/stage3_sft" \
  model.init="$qs/stage2_pretrain/final" teacher="$qs/stage0_base/final" data_root="$data" "$@"
source "$(dirname "$0")/rerun_common.sh"
model=$out/model
assemble_model "$model" "$out/stage3_sft/final" "$qs/model/decoder"
order=$(question_first_flag "$data")  # ask as the model was trained
$orion eval shapes-gen --model "$model" --out "$out/eval/gen" --train-gen "$data/gen.jsonl" 2>/dev/null | tail -n 1 > "$out/gen.json"
$orion eval shapes-und --model "$model" --data "$qs/data/eval" --n 1000 $order 2>/dev/null | tail -n 1 > "$out/und.json"
$orion eval shapes-edit --model "$model" --data "$qs/data/eval" 2>/dev/null | tail -n 1 > "$out/edit.json"
$py benchmarks/interleaved_answers.py --model "$model" --data "$inter" --n 300 2>/dev/null | tail -n 1 > "$out/inter.json"
cat "$out/gen.json" "$out/und.json" "$out/edit.json" "$out/inter.json"
$py - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
load = lambda f: json.load(open(f"{out}/{f}.json"))
gen, und, edit, inter = load("gen"), load("und"), load("edit"), load("inter")
print(json.dumps({"run": out, "gen": gen["overall"], "single": gen["single_object"],
                  "unseen": gen["unseen_scores"]["overall"], "n_unseen": gen["unseen"], "und": und["overall"],
                  "edit": edit["overall"], "interleaved": inter["overall"],
                  "interleaved_swapped": inter["overall_swapped"]}))
EOF
