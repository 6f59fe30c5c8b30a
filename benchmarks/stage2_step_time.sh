# Stage-2 step time from two stage-0 bases on the same data (issue 16, session 3): 60 steps each,
# mean seconds per step printed per base. Usage: bash benchmarks/stage2_step_time.sh old|new|newflush ...
# (old: runs/qs-final2, new: runs/qs-s3; the quickstart folders whose stage1_warmup / stage0_base it starts from)
cd /work/main
for which in "$@"; do
  if [ $which = old ]; then q=runs/qs-final2; else q=runs/qs-s3; fi
  flush=False; [ $which = newflush ] && flush=True
  rm -rf runs/exp/speed-$which
  .venv/bin/python -c "import sys, torch; torch.set_flush_denormal($flush); from orion_mllm.cli import main; sys.exit(main())" \
    train recipes/shapes/tiny/stage2_pretrain.yaml --output runs/exp/speed-$which \
    model.init=/work/main/$q/stage1_warmup/final teacher=/work/main/$q/stage0_base/final \
    data_root=runs/qs-s3/data/shapes-tiny train.max_steps=60 checkpoint.every=1000 > runs/exp/speed-$which.log 2>&1
  python3 -c "
import json; rows=[json.loads(l) for l in open('runs/exp/speed-$which/metrics.jsonl')][10:]
print('$which', round(sum(r['tokens']/r['tokens_per_s'] for r in rows)/len(rows),3), 's/step')"
done
