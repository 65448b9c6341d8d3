#!/usr/bin/env bash
# The GPU check: dbot-bench step for ViT-H/14 on one GPU (H100/H200) over stage-0 and full-depth teachers,
# micro-batch 64 and 128, activation checkpointing off and on, each with --baseline; dbot-plan for the same
# settings; one markdown table at the end (paste it into BENCHMARKS.md with the card, date and command).
# About 4-6 minutes on one H100. Run from the repository root:
#   ./launch/gpu_check.sh [RESULTS_DIR]
# Needs, on the GPU node: Python >= 3.10 with a CUDA build of torch, and this repository installed
# (`pip install -e .`, which brings deepspeed 0.19.x, timm, webdataset, accelerate, transformers). A node without
# internet access needs those wheels copied in first: on a machine with access run
#   pip download --no-deps -d wheels 'deepspeed==0.19.8' hjson webdataset braceexpand pydantic pydantic-core \
#       annotated-types typing-inspection typing-extensions timm safetensors
# copy wheels/ over and run `pip install --no-index --no-deps wheels/*.whl`, then run this script with PYTHONPATH
# set to the repository root (or after `pip install --no-deps -e .`).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$results"
arch=${ARCH:-vit_huge_patch14}
steps=${STEPS:-10}
warmup=${WARMUP:-3}
for depth in 0 full; do
  for mb in 64 128; do
    for ckpt in 0 1; do
      name="vit_h_depth${depth}_mb${mb}_ckpt${ckpt}"
      echo "== $name"
      timeout 300 python3 -m dbot_ds.bench step --arch "$arch" --micro-batch "$mb" --ckpt "$ckpt" \
        --teacher-depth "$depth" --zero zero2 --teacher replicated --steps "$steps" --warmup "$warmup" \
        --baseline --json "$results/$name.json" 2>&1 | grep -v '^\[20' | tail -5
      plan_depth=(); [ "$depth" = 0 ] && plan_depth=(--teacher-depth 0)
      python3 -m dbot_ds.plan --arch "$arch" --zero 2 --world 1 --micro-batch "$mb" --ckpt "$ckpt" \
        --teacher replicated "${plan_depth[@]}" --json > "$results/$name.plan.json"
    done
  done
done
# The cost of DeepSpeed's per-step inf/NaN gradient check (bf16.check_grad_overflow, optim.skip_nonfinite_steps):
# the same full-depth micro-batch-128 step without it; compare img/s with vit_h_depthfull_mb128_ckpt0.json.
echo "== vit_h_depthfull_mb128_ckpt0 without the overflow check"
timeout 300 python3 -m dbot_ds.bench step --arch "$arch" --micro-batch 128 --ckpt 0 --teacher-depth full --zero zero2 \
  --teacher replicated --steps "$steps" --warmup "$warmup" --set optim.skip_nonfinite_steps=false \
  --json "$results/overflow_check_off.json" 2>&1 | grep -v '^\[20' | tail -2
python3 - "$results" <<'PY'
import json, sys, pathlib
rows = []
for bench in sorted(pathlib.Path(sys.argv[1]).glob("vit_h_*[0-9].json")):
    plan = json.loads(bench.with_suffix(".plan.json").read_text().splitlines()[-1])
    b = json.loads(bench.read_text())
    predicted = plan["gib"]["total"]
    rows.append(f"| {b['teacher_depth']} | {b['micro_batch']} | {b['act_ckpt_every']} | {b['img_per_s_per_gpu']:.0f} | "
                f"{b['tflops_per_gpu']:.0f} | {100 * b['mfu']:.1f}% | {b.get('baseline_img_per_s_per_gpu', 0):.0f} | "
                f"{b.get('speedup', 0):.2f}x | {b['peak_mem_gib']:.1f} | {predicted:.1f} | "
                f"{100 * (predicted - b['peak_mem_gib']) / b['peak_mem_gib']:+.0f}% |")
last = json.loads(bench.read_text())
print(f"\n{last['arch']} {last['img_size']}px, ZeRO-2, replicated teacher, bf16, 1 GPU: {last['device']}")
print("| teacher depth | micro-batch | ckpt | img/s/GPU | TFLOP/s | MFU | baseline img/s | speedup | peak GiB | dbot-plan GiB | plan error |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
