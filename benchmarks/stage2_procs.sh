# Stage-2 seconds per step with the machine's cores used two ways (issue 16's time target): one process
# with OMP_NUM_THREADS threads, or N processes (FSDP2 over gloo, `orion train --nproc N`) of one thread
# each. Same start, data and steps (the tiny stage-2 recipe from a finished quickstart's stage 1).
# Usage: bash benchmarks/stage2_procs.sh QS [STEPS]   (QS: a finished tiny quickstart folder)
# Prints "mode s/step" per run (the mean over steps after the tenth), JSON last.
set -euo pipefail
orion=${ORION:-.venv/bin/orion}
qs=$(realpath "$1"); steps=${2:-60}
common=(model.init="$qs/stage1_warmup/final" teacher="$qs/stage0_base/final" data_root="$qs/data/shapes-tiny"
        shapes_data=null train.max_steps="$steps" checkpoint.every=100000 drift.every=0)
results=()
for mode in 1x2 2x1; do
  out=runs/exp/procs-$mode; rm -rf "$out"
  if [ $mode = 1x2 ]; then
    OMP_NUM_THREADS=2 $orion train recipes/shapes/tiny/stage2_pretrain.yaml --output "$out" "${common[@]}" > "$out.log" 2>&1
  else
    OMP_NUM_THREADS=1 $orion train recipes/shapes/tiny/stage2_pretrain.yaml --nproc 2 --output "$out" "${common[@]}" > "$out.log" 2>&1
  fi
  s=$(python3 -c "
import json; rows=[json.loads(l) for l in open('$out/metrics.jsonl')][10:]
print(round(sum(r['tokens']/r['tokens_per_s'] for r in rows)/len(rows),3))")
  echo "$mode $s s/step"; results+=("\"$mode\": $s")
done
echo "{$(IFS=,; echo "${results[*]}"), \"steps\": $steps, \"qs\": \"$qs\"}"
