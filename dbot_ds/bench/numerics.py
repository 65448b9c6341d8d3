"""How far bf16 drifts from fp32 for ViT-B shapes, on real images, on the CPU (no GPU, no DeepSpeed engine):

1. Teacher targets (`teacher.precision`): the vit_b recipe's stage-0 teacher (the random initial 12-block ViT-B
   encoder, no final norm) on real photographs, run three ways through our Teacher class: fp32 weights in fp32
   (the reference), bf16 weights (`teacher.precision=bf16`), fp32 weights under bf16 autocast
   (`teacher.precision=fp32`). Reported per token: cosine to the fp32 target, raw and after the loss's per-token
   standardisation, and the relative L2 error.
2. Gradient reduction (`optim.grad_reduce_dtype`): 2 ranks (torch.distributed, gloo, 2 processes spawned here),
   each computing the ViT-B student's bf16 gradient of the dBOT loss on its own images against that teacher; the
   gradient is then averaged as DeepSpeed ZeRO-1/2 does (pre-divide by the world size, all-reduce) once in bf16
   and once in fp32, and compared with the exact fp32 mean of the same bf16 gradients. A W-rank ring (NCCL's
   reduce-scatter adds each incoming partial sum to the local one and stores bf16, W-1 times per element) is
   emulated by summing the two ranks' gradients alternately, W in all.

    python -m dbot_ds.bench.numerics                     # about 2-3 minutes on 2 CPU cores
    python -m dbot_ds.bench.numerics --images 4 --batch 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dbot_ds.config import load_config
from dbot_ds.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dbot_ds.model.objective import dbot_loss, standardize_tokens
from dbot_ds.model.vit import build_student

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina")


def real_images(n: int, size: int = 224) -> torch.Tensor:
    """n photographs from scikit-image, centre-cropped and resized (bicubic) to size, ImageNet-normalised:
    [n, 3, size, size] fp32."""
    import skimage.data
    out = []
    for name in (IMAGES * ((n + len(IMAGES) - 1) // len(IMAGES)))[:n]:
        img = np.asarray(getattr(skimage.data, name)())
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        h, w = img.shape[:2]
        s = min(h, w)
        crop = torch.from_numpy(np.ascontiguousarray(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]))
        x = crop.permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        out.append(x)
    x = torch.cat(out)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    if len(out) > len(IMAGES):                      # repeated photographs: flip the repeats so no two are equal
        x[len(IMAGES):] = x[len(IMAGES):].flip(-1)
    return (x - mean) / std


def _teacher(cfg, precision: str, compute: torch.dtype, state: dict):
    from dbot_ds.teachers.placement import Teacher
    cfg.teacher.precision = precision
    t = Teacher(cfg, torch.device("cpu"), compute)
    t.rebuild(cfg.teacher.init_depth, state)
    return t


def _cos_stats(a: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = F.cosine_similarity(a.float(), ref.float(), dim=-1).flatten()
    return {"mean": cos.mean().item(), "min": cos.min().item(), "p01": torch.quantile(cos.double(), 0.01).item()}


def measure_targets(cfg, images: torch.Tensor, batch: int) -> dict:
    """Per-token agreement of bf16 / fp32-under-autocast teacher targets with fp32 ones."""
    student = build_student(cfg.model, seed=0)
    state = {k: v.detach().clone() for k, v in student.encoder.named_parameters()}
    runs = {"fp32": ("fp32", torch.float32), "bf16": ("bf16", torch.bfloat16), "fp32_autocast": ("fp32", torch.bfloat16)}
    out = {name: [] for name in runs}
    for name, (precision, compute) in runs.items():
        teacher = _teacher(cfg, precision, compute, state)
        for i in range(0, len(images), batch):
            out[name].append(teacher(images[i:i + batch].to(compute)).float())
    ref = torch.cat(out["fp32"])
    result = {"tokens": ref.shape[0] * ref.shape[1], "target_rms": ref.pow(2).mean().sqrt().item()}
    for name in ("bf16", "fp32_autocast"):
        got = torch.cat(out[name])
        result[name] = {"cos": _cos_stats(got, ref),
                        "cos_standardised": _cos_stats(standardize_tokens(got), standardize_tokens(ref)),
                        "rel_l2": ((got - ref).norm() / ref.norm()).item()}
    return result


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _ring(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """Mean over `world` ranks as a bf16 ring reduce-scatter computes it: pre-divided bf16 gradients, each hop
    adds one rank's contribution to the running partial sum and stores it in bf16."""
    acc = (grads[0] / world).to(torch.bfloat16)
    for r in range(1, world):
        acc = (acc.float() + (grads[r % len(grads)] / world).to(torch.bfloat16).float()).to(torch.bfloat16)
    return acc


def _rank_main(rank: int, world: int, port: int, images: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(preset="vit_b")
    student = build_student(cfg.model, seed=0)
    state = {k: v.detach().clone() for k, v in student.encoder.named_parameters()}
    teacher = _teacher(cfg, "bf16", torch.bfloat16, state)
    student = student.to(torch.bfloat16)              # DeepSpeed's bf16 module: bf16 weights, bf16 gradients
    x = images[rank::world].to(torch.bfloat16)
    torch.manual_seed(rank)
    pred, mask = student(x)
    dbot_loss(pred, teacher(x), mask).backward()
    g = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])   # bf16
    reduced_bf16 = g / world                          # DeepSpeed allreduce_bucket: divide, then all_reduce
    dist.all_reduce(reduced_bf16)
    reduced_fp32 = g.float() / world
    dist.all_reduce(reduced_fp32)
    both = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(both, g)
    if rank == 0:
        exact = sum(b.double() for b in both) / world
        res = {"grad_elements": g.numel(), "world": world,
               "bf16_reduce": _rel(reduced_bf16, exact),
               "fp32_reduce": _rel(reduced_fp32, exact),
               "fp32_reduce_stored_bf16": _rel(reduced_fp32.to(torch.bfloat16), exact),
               # sampling noise for scale: how much the two ranks' gradients (2 images each) disagree
               "rank_disagreement": _rel(both[0], exact) if world == 2 else None,
               "bf16_ring_emulated": {}}
        stride = max(1, g.numel() // (1 << 23))         # the emulation on an even subsample of ~8 M elements
        sub = [b[::stride] for b in both]
        for w in (2, 8, 32):
            exact_w = sum(sub[r % world].double() for r in range(w)) / w
            res["bf16_ring_emulated"][w] = _rel(_ring(sub, w), exact_w)
        queue.put(res)
    dist.barrier()
    dist.destroy_process_group()


def measure_grad_reduce(images: torch.Tensor, world: int = 2) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, images, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=900)
    for p in procs:
        p.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="real images for the target comparison")
    ap.add_argument("--batch", type=int, default=4, help="teacher batch for the target comparison")
    ap.add_argument("--grad-images", type=int, default=4, help="images for the gradient (split over 2 ranks)")
    ap.add_argument("--json", default="", help="also write the numbers here")
    args = ap.parse_args(argv)
    cfg = load_config(preset="vit_b")
    t0 = time.perf_counter()
    result = {"torch": torch.__version__, "targets": measure_targets(cfg, real_images(args.images), args.batch)}
    result["targets_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result["grad_reduce"] = measure_grad_reduce(real_images(args.grad_images))
    result["grad_reduce_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
