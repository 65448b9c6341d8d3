#!/usr/bin/env bash
# dBOT ViT-H/14, the reference recipe (2 stages x 800 epochs, global batch 4096 = 32 ranks x 128), on 4 nodes
# x 8 A100-80G with the deepspeed launcher (pdsh over ssh to the hosts in the hostfile).
# Re-running this script after a crash or preemption resumes from the newest complete checkpoint.
#   SHARDS='/data/in1k/shard-{000000..001281}.tar' OUT=/ckpt/dbot_vit_h HOSTFILE=launch/hostfile ./launch/vit_h_32xa100.sh
set -euo pipefail
: "${SHARDS:?set SHARDS to your ImageNet-1K webdataset shards}"
OUT=${OUT:-runs/dbot_vit_h}
HOSTFILE=${HOSTFILE:-launch/hostfile}
cd "$(dirname "$0")/.."
exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --module dbot_ds.pretrain \
  --preset vit_h --resume auto \
  data.shards="$SHARDS" run.out_dir="$OUT" "$@"
