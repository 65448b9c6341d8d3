#!/usr/bin/env bash
# The GPU check of issue 9, in phases, for a GPU lent for minutes. Run from the repository root:
#   ./launch/gpu_check.sh PHASE... [RESULTS_DIR defaults to $OUT, else /tmp/gpu_check]
#     table   `dbot-bench sweep launch/gpu_cases.txt`: the ViT-H/14 step table (stage-0 and full teachers, ZeRO-2/3,
#             checkpointing off/on, teacher replicated/zero3, as large a micro-batch as fits), ViT-L/B rows, the
#             reference-style baseline in the same process, dbot-plan's memory beside each measured peak.
#             Starts no case after $DEADLINE s (default 300), so a call ends within about a minute of that.
#     levers  `dbot-bench sweep launch/gpu_levers.txt`: torch.compile and micro-batch against the same step
#             (no case after $DEADLINE s, default 150).
#     train   launch/gpu_train.sh: a real dbot-pretrain run, ViT-B/16 through a stage switch (~2 min).
#     fp8     `dbot-bench fp8`: the frozen teacher's forward in FP8 against bf16 targets (parity, speed, loss curve).
#             Real photos from scikit-image, or from data/photos where it is missing (carry it; see the phase).
# The device tool's two calls: `./launch/gpu_check.sh table`, then `./launch/gpu_check.sh train levers fp8`
# (phases run in the order given: the issue's priorities).
# Every phase writes into RESULTS_DIR (JSONL/JSON rows and a markdown table) and prints as it goes, so a time
# limit loses only the case in flight. Paste the tables into BENCHMARKS.md with the card, date and command.
#
# Needs Python >= 3.10 with a CUDA build of torch, timm, accelerate and transformers, plus deepspeed 0.19.x,
# hjson, webdataset, braceexpand, pydantic, einops and msgpack. On an offline node whose image lacks them, collect
# their wheels into .whl/ first (`launch/gpu_wheels.sh` on a machine with PyPI): this script installs
# .whl/*.whl into /tmp/site and puts it and the repository on PYTHONPATH when deepspeed is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
phases=(); results=${OUT:-/tmp/gpu_check}
for arg in "$@"; do
  case "$arg" in table|levers|train|fp8) phases+=("$arg") ;; *) results=$arg ;; esac
done
[ ${#phases[@]} -gt 0 ] || { echo "usage: $0 {table|levers|train|fp8}... [RESULTS_DIR]" >&2; exit 2; }
mkdir -p "$results"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "deepspeed is not installed and .whl/ holds no wheels (see the header)" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=$PATH:/tmp/site/bin    # bin: ninja
# (torch, CUDA, deepspeed and timm versions are in every sweep row: no extra Python start here)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; nproc
  git log -1 --oneline 2>/dev/null; } | tee "$results/env.txt"
quiet() { grep -v -e '^\[20' -e 'FutureWarning' -e 'return func(\*args' ; }
rc=0
for phase in "${phases[@]}"; do
  start=$(date +%s)
  echo "== phase $phase"
  case "$phase" in
    table|levers)
      cases=launch/gpu_cases.txt; [ "$phase" = levers ] && cases=launch/gpu_levers.txt
      cases=${CASES:-$cases}          # another cases file (the CPU test of this script uses a tiny one)
      deadline=300; [ "$phase" = levers ] && deadline=150
      python3 -m dbot_ds.bench sweep "$cases" --out "$results/$phase.jsonl" --deadline-s "${DEADLINE:-$deadline}" 2>&1 | quiet
      rc=$((rc | PIPESTATUS[0]))
      python3 -m dbot_ds.bench table "$results/$phase.jsonl" > "$results/$phase.md" ;;   # the sweep printed it
    train)
      ./launch/gpu_train.sh "$results" || rc=1 ;;
    fp8)
      # Real photos: scikit-image's, or where it is missing (the lent GPU image) the copy carried in data/photos
      # (`dbot-bench fp8 --save-photos data/photos` on a machine with scikit-image).
      photos=(); [ -d data/photos ] && photos=(--photos data/photos)
      fp8() { python3 -m dbot_ds.bench fp8 ${photos[@]+"${photos[@]}"} "$@" 2>&1 | quiet | grep -v '^{' | tail -12; rc=$((rc | PIPESTATUS[0])); }
      # ViT-B: parity, speed and 200-step loss curves (bf16 vs fp8 targets, fp32 for scale); ViT-H: parity and
      # speed; the ViT-B stage-0 encoder of the `train` phase, if it ran: parity of a (briefly) trained teacher.
      fp8 --arch vit_base_patch16 --micro-batch 128 --train-batch 32 --steps 200 --images 256 --fp32-run \
        --json "$results/fp8_vit_base_patch16.json"
      fp8 --arch vit_huge_patch14 --micro-batch 128 --steps 0 --images 256 --json "$results/fp8_vit_huge_patch14.json"
      trained=${WORK:-/tmp/dbot_gpu_train}/run/stage_encoders/stage0
      [ -d "$trained" ] && fp8 --weights "$trained" --micro-batch 128 --steps 0 --images 256 \
        --json "$results/fp8_vit_base_trained.json" ;;
  esac
  echo "== phase $phase: $(( $(date +%s) - start )) s"
done
exit "$rc"
