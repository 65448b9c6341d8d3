#!/usr/bin/env bash
# Wheels for the lent GPU node (Python 3.12, no network), into ./.whl (carry it): the shared collection
# (../shared/device/wheels.sh: deepspeed, hjson, webdataset, braceexpand, pydantic and its needs) plus what
# `import deepspeed` 0.19.8 also imports and the node's image (torch, timm, accelerate, transformers) may lack:
# einops, msgpack, py-cpuinfo, nvidia-ml-py, and ninja for DeepSpeed's JIT ops. Installed into /tmp/site by
# launch/gpu_check.sh when deepspeed is missing there; a package the image already has is only shadowed.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
shared=../shared/device/wheels.sh
if [ -x "$shared" ] || [ -f "$shared" ]; then bash "$shared"; else echo "no $shared: collecting only the extras" >&2; fi
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  einops msgpack py-cpuinfo nvidia-ml-py ninja
ls -1 .whl
du -sh .whl
