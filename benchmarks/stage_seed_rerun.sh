# ORION's stages 1-3 of a finished tiny quickstart, retrained with another seed on the same base, data and
# decoder, then shapes-gen and shapes-und of the result: how far drawing moves with the seed alone
# (issue 16). Usage: [DATA=DIR] bash benchmarks/stage_seed_rerun.sh QS SEED [OUT]
#   QS: a finished `orion quickstart --preset tiny` folder; OUT: default runs/seed-rerun-<QS name>-s<SEED>.
#   DATA: the ShapesWorld folder to train on (default QS/data/shapes-tiny; a missing one is generated),
#   e.g. to retrain QS's base with data of today's generator. HOLDOUT=pairs: the hold-out of quickstarts
#   from before session 7 of issue 16 (their data folders are refused under today's `holdout: captions`).
#   LATE="KEY=VALUE ...": recipe overrides for stages 2 and 3 only (e.g. a higher visual_input_noise).
# train.seed sets the head's initialisation, the data order and the noise/dropout draws. Prints the
# two evaluations' JSON (shapes-gen with the unseen split, then shapes-und) last.
set -euo pipefail
orion=${ORION:-.venv/bin/orion}  # the repository's environment (scripts/install.sh)
qs=$(realpath "$1"); seed=$2; out=${3:-runs/seed-rerun-$(basename "$qs")-s$seed}
data=${DATA:-$qs/data/shapes-tiny}
mkdir -p "$out"
# The base as a finished sibling run, so stage 1's `init: previous` finds it as it does in the quickstart.
[ -d "$out/stage0_base" ] || cp -r "$qs/stage0_base" "$out/stage0_base"
for stage in stage1_warmup stage2_pretrain stage3_sft; do
  late=(); [ "$stage" = stage1_warmup ] || read -ra late <<< "${LATE:-}"
  $orion train recipes/shapes/tiny/$stage.yaml --output "$out/$stage" data_root="$data" train.seed="$seed" \
    ${HOLDOUT:+shapes_data.holdout=$HOLDOUT} "${late[@]}"
done
source "$(dirname "$0")/rerun_common.sh"
model=$out/model
assemble_model "$model" "$out/stage3_sft/final" "$qs/model/decoder"
order=$(question_first_flag "$data")  # ask as the model was trained
$orion eval shapes-gen --model "$model" --out "$out/eval/gen" --train-gen "$data/gen.jsonl" 2>/dev/null | tail -n 1 > "$out/gen.json"
$orion eval shapes-und --model "$model" --data "$qs/data/eval" --size 64 $order 2>/dev/null | tail -n 1 > "$out/und.json"
cat "$out/gen.json" "$out/und.json"
