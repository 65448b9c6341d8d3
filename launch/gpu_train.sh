#!/usr/bin/env bash
# Issue 9, item 5: a real dbot-pretrain run on one GPU. ViT-B/16 student on generated 224 px JPEG shards, a
# depth-0 stage-0 teacher (the fastest step, so the hardest test for the loader), 150 + 150 steps through the
# stage switch, the kNN monitor on, data.num_workers = CPUs - 2. Prints `dbot-bench run-summary` (img/s per GPU
# and data-wait fraction per stage, finite losses, the swap) and copies metrics.jsonl + config to RESULTS_DIR.
#   ./launch/gpu_train.sh [RESULTS_DIR] [extra key=value overrides]
# About 2 minutes on an H100 node with 16 cores. Env: NUM (images, default 12000), STEPS (per stage, 150),
# BATCH (256), WARMUP (steps, 20), EVAL_EVERY (100), WORK (scratch folder, /tmp/dbot_gpu_train; wiped first
# if this script made it, refused otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-/tmp/gpu_check}}; shift || true
work=${WORK:-/tmp/dbot_gpu_train}; num=${NUM:-12000}; steps=${STEPS:-150}; batch=${BATCH:-256}; eval_every=${EVAL_EVERY:-100}; warmup=${WARMUP:-20}
cpus=$(nproc); workers=$(( cpus > 3 ? cpus - 2 : 1 )); gens=$(( cpus > 8 ? 8 : cpus ))
# WORK is wiped first, but only if this script made it (its marker file): never a folder of the user's.
if [ -e "$work" ] && [ ! -f "$work/.dbot_gpu_train" ]; then
  echo "WORK=$work exists and was not made by $0; give another WORK (it is wiped at every run)" >&2; exit 2
fi
rm -rf "$work"; mkdir -p "$work/shards" "$results"; touch "$work/.dbot_gpu_train"
t0=$(date +%s)
# dbot-shards writes one folder per call; generate in parallel and gather the tars into one manifest-less
# folder (the trainer counts their samples from the tar headers once).
for i in $(seq 0 $((gens - 1))); do
  python3 -m dbot_ds.data.shards synthetic --out "$work/gen$i" --num $((num / gens)) --img-size 224 --seed "$i" \
    --per-shard 500 >/dev/null &
done
wait
for i in $(seq 0 $((gens - 1))); do for t in "$work/gen$i"/*.tar; do mv "$t" "$work/shards/g$i-$(basename "$t")"; done; done
echo "== $num generated 224 px JPEGs in $(( $(date +%s) - t0 )) s; training with $workers loader workers"
python3 -m dbot_ds.pretrain --preset vit_b teacher.init_depth=0 "schedule.stage_steps=[$steps,$steps]" \
  schedule.warmup_steps="$warmup" data.num_samples=0 optim.global_batch="$batch" optim.micro_batch="$batch" data.shards="$work/shards" \
  data.num_workers="$workers" run.out_dir="$work/run" run.save_every=1000000 run.progress=false run.log_every=10 \
  eval.shards="$work/eval" eval.synthetic_num=1000 eval.every_steps="$eval_every" "$@" 2>&1 | grep -v '^\[20' | tail -40
rc=${PIPESTATUS[0]}
echo "== dbot-pretrain exit code $rc after $(( $(date +%s) - t0 )) s"
cp "$work/run/metrics.jsonl" "$results/train_metrics.jsonl" 2>/dev/null
cp "$work/run/config.yaml" "$results/train_config.yaml" 2>/dev/null
[ -f "$work/run/metrics.jsonl" ] && python3 -m dbot_ds.bench run-summary "$work/run" --json "$results/train_summary.json" | head -20
exit "$rc"
