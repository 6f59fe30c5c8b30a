# Stage-2 step time from different stage-0 bases on the same data (issue 16): 60 steps each, mean seconds
# per step printed per run. Usage: bash benchmarks/stage2_step_time.sh QS[:flush] ...
# QS: a quickstart folder under runs/ (its stage1_warmup / stage0_base are the start); ":flush" runs
# with torch.set_flush_denormal(True). Data: runs/qs-s3/data/shapes-tiny (DATA=... to change);
# EXTRA="key=value ..." adds recipe overrides (e.g. loss.kl=0).
cd /work/main
data=${DATA:-runs/qs-s3/data/shapes-tiny}
for arg in "$@"; do
  q=runs/${arg%%:*}; flush=False; [ "${arg#*:}" = flush ] && flush=True
  name=$(echo $arg | tr ':' '-')
  rm -rf runs/exp/speed-$name
  .venv/bin/python -c "import sys, torch; torch.set_flush_denormal($flush); from orion_mllm.cli import main; sys.exit(main())" \
    train recipes/shapes/tiny/stage2_pretrain.yaml --output runs/exp/speed-$name \
    model.init=/work/main/$q/stage1_warmup/final teacher=/work/main/$q/stage0_base/final \
    data_root=$data train.max_steps=60 checkpoint.every=1000 $EXTRA > runs/exp/speed-$name.log 2>&1
  python3 -c "
import json; rows=[json.loads(l) for l in open('runs/exp/speed-$name/metrics.jsonl')][10:]
print('$arg', round(sum(r['tokens']/r['tokens_per_s'] for r in rows)/len(rows),3), 's/step')"
done
