"""dbot-plan: GPU memory of a dBOT step per rank, before any GPU time is spent.

    dbot-plan --arch vit_huge_patch14 --zero 2 --world 32 --micro-batch 128 --ckpt 0 --teacher replicated
    dbot-plan --arch vit_gigantic_patch14 --zero 3 --world 32 --micro-batch 64 --ckpt 1 --teacher zero3 --json

The model is in bytes per rank, bf16 mixed precision as the trainer runs it:
- student weights 2 P (ZeRO-3: 2 P / W plus the gathered working set), gradients 2 P (ZeRO-2/3: 2 P / W plus
  DeepSpeed's bucket), AdamW fp32 master + 2 moments 12 P (ZeRO-1/2/3: / W; offloaded: 0);
- teacher 2 Pt (zero3 placement: 2 Pt / W plus one gathered block);
- activations from the architecture: a pre-norm block with fused (flash) attention keeps about
  s h (16 + 4 r) bytes per image (s tokens, width h, MLP ratio r: LN and linear inputs, Q/K/V/O, the MLP's
  hidden input and GELU output, all bf16); a checkpointed block keeps only its 2 s h input, plus one block
  recomputed at a time; plus the fp32 loss tensors over all tokens and the images;
- buffers: CUDA context and allocator slack (1.5 GiB), DeepSpeed's reduce / all-gather buckets.
P counts come from building the model on the meta device, so any size of one's own is covered.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

from .config import ARCHS, ModelConfig, load_config, zero_name
from .models import Student, build_teacher

GIB = 1024**3
# Memory a process can allocate, GiB (the lent H100 reported about 78 GiB; vendor sizes are GB).
GPUS = {"A100-80G": 79.2, "H100-80G": 79.1, "H200-141G": 139.8}
CONTEXT_BYTES = 1.5 * GIB
BUCKET_ELEMENTS = 2e8          # reduce_bucket_size / allgather_bucket_size in ds_configs/zero2.json
PREFETCH_ELEMENTS = 1e8        # stage3_prefetch_bucket_size in ds_configs/zero3.json


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    teacher: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 2) for k, v in asdict(self).items()}, "total": round(self.total / GIB, 2)}


def param_counts(cfg: ModelConfig, teacher_depth: int) -> tuple[int, int, int]:
    """(student params, teacher params, params of the student's largest block), built on the meta device."""
    with torch.device("meta"):
        student = Student(cfg)
        teacher = build_teacher(cfg, teacher_depth, final_norm=False)
    block = max(sum(p.numel() for p in b.parameters()) for b in student.encoder.blocks) if cfg.depth else 0
    return (sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters()), block)


def block_activation_bytes(tokens: int, width: int, mlp_ratio: float) -> float:
    """Bytes one pre-norm block keeps for backward per image (bf16, fused attention, no dropout)."""
    return tokens * width * (16 + 4 * mlp_ratio)


def _stack_bytes(depth: int, tokens: int, width: int, mlp_ratio: float, ckpt_every: int) -> float:
    full = block_activation_bytes(tokens, width, mlp_ratio)
    workspace = full if depth else 0          # one block's activation gradients while its backward runs
    if not ckpt_every:
        return depth * full + workspace
    ckpt = len(range(0, depth, ckpt_every))
    recompute = full if ckpt else 0           # a checkpointed block's activations, rebuilt for its backward
    return ckpt * 2 * tokens * width + (depth - ckpt) * full + recompute + workspace


def activation_bytes_per_image(cfg: ModelConfig, ckpt_every: int) -> float:
    """Activations kept per image over a micro-step (student), plus the loss tensors and the input."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    k = 1 + int(n * (1 - cfg.mask_ratio))
    enc = _stack_bytes(cfg.depth, k, cfg.embed_dim, cfg.mlp_ratio, ckpt_every)
    dec = _stack_bytes(cfg.decoder_depth, n + 1, cfg.decoder_embed_dim, cfg.mlp_ratio, ckpt_every)
    embed = 2 * n * cfg.embed_dim + 2 * k * cfg.embed_dim                 # all patch tokens, visible gather
    head = 2 * (n + 1) * (cfg.decoder_embed_dim + 2 * cfg.embed_dim)        # decoder input, predictions, targets
    loss = 5 * 4 * (n + 1) * cfg.embed_dim                                  # fp32 pred, target, standardised, diff, loss
    images = (2 + 1) * 3 * cfg.img_size**2                                  # bf16 input + uint8 batch
    return enc + dec + embed + head + loss + images


def plan(cfg: ModelConfig, *, zero: int, world: int, micro_batch: int, ckpt_every: int, teacher: str,
         teacher_depth: int | None = None, offload: bool = False) -> MemoryPlan:
    """Per-rank GPU memory of a training step (stage >= 1 teacher depth by default: the larger one)."""
    depth = cfg.depth if teacher_depth is None else teacher_depth
    p, pt, block = param_counts(cfg, depth)
    shard = world if zero >= 3 else 1
    weights = 2 * p / shard + (2 * 2 * block + 2 * PREFETCH_ELEMENTS if zero >= 3 else 0)
    grads = 2 * p / (world if zero >= 2 else 1) + (2 * BUCKET_ELEMENTS if zero >= 2 else 0)
    optimizer = 0.0 if offload else 12 * p / (world if zero >= 1 else 1)
    teacher_bytes = 2 * pt if teacher == "replicated" else 2 * pt / world + 2 * 2 * block
    activations = micro_batch * activation_bytes_per_image(cfg, ckpt_every)
    buffers = CONTEXT_BYTES + (2 * BUCKET_ELEMENTS if zero == 2 else 0)
    return MemoryPlan(weights, grads, optimizer, teacher_bytes, activations, buffers)


def max_micro_batch(cfg: ModelConfig, gpu_gib: float, **kw) -> int:
    """Largest micro-batch whose plan fits in `gpu_gib` (0 if not even one image fits)."""
    fixed = plan(cfg, micro_batch=0, **kw).total
    per_image = activation_bytes_per_image(cfg, kw["ckpt_every"])
    return max(0, math.floor((gpu_gib * GIB - fixed) / per_image))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dbot-plan", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", default="vit_huge_patch14", choices=sorted(ARCHS))
    p.add_argument("--zero", type=zero_name, default="zero2", choices=["zero0", "zero1", "zero2", "zero3", "zero3_offload"],
                   help="ZeRO stage: 0-3 or zero0..zero3, zero3_offload (sets --offload), as dbot-bench spells it")
    p.add_argument("--world", type=int, default=32, help="ranks (GPUs) in total")
    p.add_argument("--micro-batch", type=int, default=128, help="images per GPU per forward")
    p.add_argument("--ckpt", type=int, default=0, help="activation checkpointing: 0 off, 1 all, k every k-th block")
    p.add_argument("--teacher", default="replicated", choices=["replicated", "zero3"])
    p.add_argument("--teacher-depth", type=int, default=None, help="default: the student's depth (stage >= 1)")
    p.add_argument("--offload", action="store_true", help="optimizer states in CPU memory (zero3_offload)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.offload = a.offload or a.zero == "zero3_offload"
    a.zero = int(a.zero[4])
    overrides = ["schedule.stage_steps=[1]", f"model.arch={a.arch}"] + ([f"model.img_size={a.img_size}"] if a.img_size else [])
    cfg = load_config(overrides=overrides).model
    kw = dict(zero=a.zero, world=a.world, ckpt_every=a.ckpt, teacher=a.teacher, teacher_depth=a.teacher_depth,
              offload=a.offload)
    mem = plan(cfg, micro_batch=a.micro_batch, **kw)
    out = {"arch": a.arch, "img_size": cfg.img_size, "zero": a.zero, "world": a.world, "micro_batch": a.micro_batch,
           "ckpt_every": a.ckpt, "teacher": a.teacher, "gib": mem.gib(),
           "fits": {g: mem.total <= cap * GIB for g, cap in GPUS.items()},
           "max_micro_batch": {g: max_micro_batch(cfg, cap, **kw) for g, cap in GPUS.items()}}
    if not a.json:
        print(f"{a.arch} {cfg.img_size}px  ZeRO-{a.zero}  world {a.world}  micro-batch {a.micro_batch}  "
              f"ckpt {a.ckpt}  teacher {a.teacher}")
        for k, v in out["gib"].items():
            print(f"  {k:<12} {v:8.2f} GiB")
        for g in GPUS:
            print(f"  {g:<12} {'fits' if out['fits'][g] else 'does NOT fit':<13} largest micro-batch "
                  f"{out['max_micro_batch'][g]}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
