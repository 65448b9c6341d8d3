"""`dbot-bench memcheck`: dbot-plan's activation term against the bytes torch actually holds, on any device.

    dbot-bench memcheck --arch vit_huge_patch14 --ckpt 0 1 2 --batch 2

One student training micro-step (bf16 weights, forward, loss, backward into preallocated gradients) runs under
torch's MemTracker, which counts every live tensor by kind. Its peak minus the weights, gradients and inputs,
per image, is set beside `plan.activation_bytes_per_image`. Tensor bytes do not depend on the device, apart
from the attention kernel's own saved tensors and the allocator's slack (which the GPU table measures), so
this checks the activation model without a GPU.
"""
from __future__ import annotations

import argparse
import json

import torch

from dbot_ds.config import load_config
from dbot_ds.model.objective import dbot_loss
from dbot_ds.model.vit import build_student
from dbot_ds.plan.memory import activation_bytes_per_image

MIB = 2**20


def tracked_activation_bytes(arch: str, ckpt_every: int, batch: int, img_size: int | None = None) -> float:
    """Peak bytes per image of a student micro-step beyond its weights, gradients and inputs (MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    overrides = [f"model.arch={arch}", "schedule.stage_steps=[1]", f"model.act_ckpt_every={ckpt_every}"]
    cfg = load_config(overrides=overrides + ([f"model.img_size={img_size}"] if img_size else [])).model
    student = build_student(cfg, seed=0).to(torch.bfloat16).train()
    for p in student.parameters():
        p.grad = torch.zeros_like(p)                   # DeepSpeed's gradient buffers exist before the step
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(torch.bfloat16)
    n = (cfg.img_size // cfg.patch_size) ** 2 + 1
    target = torch.randn(batch, n, cfg.embed_dim, generator=gen).to(torch.bfloat16)
    tracker = MemTracker()
    tracker.track_external(student, images, target)
    with tracker:
        pred, mask = student(images)
        dbot_loss(pred, target, mask).backward()
    peak = tracker.get_tracker_snapshot("peak")[images.device]["Total"]
    static = sum(2 * p.numel() * p.element_size() for p in student.parameters()) + images.nbytes + target.nbytes
    return (peak - static) / batch


def check(arch: str, ckpt_every: int, batch: int, img_size: int | None = None) -> dict:
    cfg = load_config(overrides=[f"model.arch={arch}", "schedule.stage_steps=[1]"]
                      + ([f"model.img_size={img_size}"] if img_size else [])).model
    tracked = tracked_activation_bytes(arch, ckpt_every, batch, img_size)
    planned = activation_bytes_per_image(cfg, ckpt_every)
    return {"arch": arch, "img_size": cfg.img_size, "ckpt": ckpt_every, "batch": batch,
            "tracked_mib_per_image": tracked / MIB, "plan_mib_per_image": planned / MIB,
            "plan_error": (planned - tracked) / tracked}


def _cmd(a: argparse.Namespace) -> int:
    rows = [check(a.arch, c, a.batch, a.img_size) for c in a.ckpt]
    print("| arch | ckpt | tracked MiB/image | dbot-plan MiB/image | plan error |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} {r['img_size']}px | {r['ckpt']} | {r['tracked_mib_per_image']:.2f} | "
              f"{r['plan_mib_per_image']:.2f} | {100 * r['plan_error']:+.1f}% |")
    print(json.dumps(rows))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("memcheck", help="dbot-plan's activation memory against torch's MemTracker")
    p.add_argument("--arch", default="vit_base_patch16")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--ckpt", type=int, nargs="+", default=[0, 1], help="activation checkpointing settings to check")
    p.add_argument("--batch", type=int, default=2)
    p.set_defaults(func=_cmd)
