# Stage-2 seconds per step with each attention implementation of the language model (issue 16's time
# target): `sdpa` (packed rows through a dense block-diagonal mask) against `documents` (one causal
# sdpa call per document, model/document_attention.py), same start, data and steps, alone on the cores.
# Usage: bash benchmarks/stage2_attention.sh QS [STEPS] [IMPL ...]   (QS: a finished tiny quickstart)
# Prints "impl s/step final-loss" per run (mean over the steps after the tenth), JSON last.
set -euo pipefail
orion=${ORION:-.venv/bin/orion}
qs=$(realpath "$1"); steps=${2:-60}; shift 2 || true
impls=("$@"); [ ${#impls[@]} -gt 0 ] || impls=(documents sdpa documents sdpa)
json=()
for k in "${!impls[@]}"; do
  impl=${impls[$k]}; out=runs/exp/attn-$k-$impl; rm -rf "$out"
  $orion train recipes/shapes/tiny/stage2_pretrain.yaml --output "$out" model.init="$qs/stage1_warmup/final" \
    teacher="$qs/stage0_base/final" data_root="$qs/data/shapes-tiny" shapes_data=null model.attn_implementation="$impl" \
    train.max_steps="$steps" checkpoint.every=100000 drift.every=0 > "$out.log" 2>&1
  line=$(python3 -c "
import json; rows=[json.loads(l) for l in open('$out/metrics.jsonl')]
print(round(sum(r['tokens']/r['tokens_per_s'] for r in rows[10:])/len(rows[10:]),3), rows[-1]['loss'])")
  echo "$impl $line"; json+=("{\"impl\": \"$impl\", \"s_per_step\": ${line% *}, \"loss\": ${line#* }}")
done
echo "{\"steps\": $steps, \"runs\": [$(IFS=,; echo "${json[*]}")]}"
