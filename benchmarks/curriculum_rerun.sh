# Stage 0's inactive curriculum phases (recipes/shapes/tiny/curriculum: multiple choice only, then the
# whole mix briefly) on top of a finished tiny quickstart's base, then ORION's stages 1-3 from that
# curriculum base with the quickstart's data and decoder (benchmarks/stage_seed_rerun.sh): does the
# curriculum's understanding survive, and what does it cost drawing (issue 16, sessions 6 and 12)?
# Usage: bash benchmarks/curriculum_rerun.sh QS [SEED] [OUT]
#   QS: a finished `orion quickstart --preset tiny` folder; OUT: default runs/curriculum-<QS name>.
# Prints the curriculum base's shapes-und, then the stages' shapes-gen and shapes-und JSON, last.
set -euo pipefail
orion=${ORION:-.venv/bin/orion}
qs=$(realpath "$1"); seed=${2:-0}; out=${3:-runs/curriculum-$(basename "$qs")}
data=$qs/data/shapes-tiny
mkdir -p "$out"
init=$qs/stage0_base/final
for phase in stage0_mcq stage0_recap; do
  $orion train recipes/shapes/tiny/curriculum/$phase.yaml --output "$out/$phase" data_root="$data" \
    model.init="$init"
  init=$out/$phase/final
done
$orion eval shapes-und --model "$init" --data "$qs/data/eval" --size 64 2>/dev/null | tail -n 1 > "$out/base_und.json"
# A quickstart-shaped folder whose base is the curriculum's last phase, for stage_seed_rerun.sh.
base_qs=$out/qs
mkdir -p "$base_qs/data" "$base_qs/model"
[ -d "$base_qs/stage0_base" ] || cp -r "$out/stage0_recap" "$base_qs/stage0_base"
ln -sfn "$data" "$base_qs/data/shapes-tiny"; ln -sfn "$qs/data/eval" "$base_qs/data/eval"
ln -sfn "$qs/model/decoder" "$base_qs/model/decoder"
bash benchmarks/stage_seed_rerun.sh "$base_qs" "$seed" "$out/stages-s$seed"
cat "$out/base_und.json"
