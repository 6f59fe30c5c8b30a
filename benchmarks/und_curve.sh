# Understanding learning curve of a training run (issue 16): every checkpoint of RUN exported
# (benchmarks/export_checkpoint.py) and scored by `orion eval shapes-und` on EVAL_DATA's first N records.
# Usage: bash benchmarks/und_curve.sh RUN EVAL_DATA [N]   (a finished checkpoint is scored once: its
# result is kept in RUN/und_curve/step_XXXXXXXX.json and reused on a second call)
# Prints one JSON line per checkpoint, {"step": S, ...shapes-und's JSON}, in step order.
set -euo pipefail
py=${PYTHON:-.venv/bin/python}; orion=${ORION:-.venv/bin/orion}
run=$1; data=$2; n=${3:-1000}
out=$run/und_curve; mkdir -p "$out"
for ck in "$run"/checkpoints/step_*; do
  [ -d "$ck" ] || continue
  name=$(basename "$ck"); step=$((10#${name#step_}))
  if [ ! -s "$out/$name.json" ]; then
    rm -rf "$out/$name.model"
    $py benchmarks/export_checkpoint.py "$ck" "$out/$name.model" > /dev/null
    $orion eval shapes-und --model "$out/$name.model" --data "$data" --n "$n" --size 64 2>/dev/null | tail -n 1 \
      | $py -c "import json, sys; print(json.dumps({'step': $step, **json.loads(sys.stdin.read())}))" > "$out/$name.json"
    rm -rf "$out/$name.model"
  fi
  cat "$out/$name.json"
done
