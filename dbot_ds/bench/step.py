"""`dbot-bench step`: time the real dBOT training step through the DeepSpeed engine.

    dbot-bench step --arch vit_huge_patch14 --micro-batch 128 --zero zero2 --ckpt 0 --teacher replicated \
        --teacher-depth full --baseline
    deepspeed --num_gpus 8 --module dbot_ds.bench.cli step --arch vit_large_patch16 --zero zero3 ...
    dbot-bench step --arch vit_tiny_patch4 --micro-batch 8 --steps 4 --warmup 1      # CPU smoke test

One step = teacher forward + student forward/backward + optimizer step (the same modules, loss and engine as
training), on synthetic images already on the device. After `--warmup` steps, each of `--steps` steps is
timed with device synchronisation between its parts; the median step gives images/s per GPU, model TFLOP/s
per GPU (FLOPs from dbot_ds.model.flops) and MFU against the GPU's peak. `--baseline` runs, in the same process on
the same data, the step as the reference code does it: plain PyTorch, fp16 autocast with a GradScaler (bf16
autocast on a CPU), unfused AdamW, the same model. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist

from dbot_ds.config import load_config, zero_name
from dbot_ds.model.flops import PEAK_TFLOPS, step_flops_per_image
from dbot_ds.model.objective import dbot_loss
from dbot_ds.model.vit import build_student, build_teacher, param_groups

GIB = 1024**3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="vit_huge_patch14")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=64, help="images per GPU per step")
    p.add_argument("--zero", default="zero2", type=zero_name,
                   help="ZeRO stage 2/3 or a ds_configs/ name (zero2, zero3, zero3_offload) or a JSON path")
    p.add_argument("--ckpt", type=int, default=0, help="activation checkpointing: 0 off, 1 all, k every k-th block")
    p.add_argument("--teacher", default="replicated", choices=["replicated", "zero3"])
    p.add_argument("--teacher-depth", default="full", help="'full' (stage >= 1), or a number (0: stage 0 of L/H)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (model.compile)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="also time the reference-style step; print the ratio")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU's name; 1.0 on a CPU")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="any other config override, e.g. --set optim.skip_nonfinite_steps=false (repeatable)")


def _config(a: argparse.Namespace, world: int):
    overrides = ["schedule.stage_steps=[1]", f"model.arch={a.arch}", f"model.act_ckpt_every={a.ckpt}",
                 f"optim.micro_batch={a.micro_batch}", f"optim.global_batch={a.micro_batch * world}",
                 f"optim.precision={a.precision}", f"deepspeed.config={a.zero}", f"teacher.placement={a.teacher}",
                 f"model.compile={a.compile}"]
    if a.img_size:
        overrides.append(f"model.img_size={a.img_size}")
    return load_config(overrides=overrides + a.set)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak(device: torch.device) -> dict:
    """Peak memory in GiB. CUDA: the allocator's peak of live tensors (`peak_mem_gib`) and the process's peak as
    nvidia-smi would show it (`peak_process_gib`: the allocator's peak reservation + what the device uses outside
    the allocator now, i.e. the CUDA context and library workspaces), the figure dbot-plan predicts. CPU: max RSS."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        outside = (total - free - torch.cuda.memory_reserved(device)) / GIB
        peak_reserved = torch.cuda.max_memory_reserved(device) / GIB
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB, "peak_mem_source": "cuda_max_allocated",
                "peak_reserved_gib": peak_reserved, "outside_allocator_gib": outside,
                "peak_process_gib": peak_reserved + outside}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return {"peak_mem_gib": rss, "peak_mem_source": "cpu_max_rss", "peak_process_gib": rss}


def free_memory(device: torch.device) -> float:
    """Drop what the last measurement left (engines hold reference cycles) and return the GiB still allocated."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device) / GIB
    return 0.0


def _versions() -> dict[str, str]:
    import deepspeed
    import timm
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "deepspeed": deepspeed.__version__,
            "timm": timm.__version__}


def _peak_tflops(a: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    if a.peak_tflops:
        return a.peak_tflops, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace(" ", "").upper()
        for gpu, tflops in PEAK_TFLOPS.items():
            if gpu.upper() in name:
                return tflops, gpu
        raise SystemExit(f"unknown GPU '{name}': pass --peak-tflops (dense bf16 TFLOP/s of the card)")
    return 1.0, "cpu_nominal"


def time_ours(cfg, depth: int, images: torch.Tensor, world: int, device: torch.device, steps: int,
              warmup: int) -> dict[str, list[float]]:
    """Per-step seconds of the parts of our step (DeepSpeed engine, teacher outside it)."""
    from dbot_ds.distributed.engine import destroy_engine, init_student_engine
    from dbot_ds.teachers.placement import Teacher
    dtype = torch.bfloat16 if cfg.optim.precision == "bf16" else torch.float32
    with torch.device(device):          # initialise on the device: ViT-H's init takes seconds on a CPU
        student = build_student(cfg.model, seed=0)
    initial = {k: v.detach().clone() for k, v in student.encoder.state_dict().items()}
    engine, _ = init_student_engine(student, cfg, world, device)
    engine.train()
    teacher = Teacher(cfg, device, dtype)
    # A replicated teacher is initialised on the device too (then overwritten); DeepSpeed's engines are built
    # outside a device context, which would also place the tensors it means for the host.
    with torch.device(device) if cfg.teacher.placement == "replicated" else contextlib.nullcontext():
        teacher.rebuild(depth, initial)
    del initial                          # the trainer keeps no such copy: it must not count in the peak
    if device.type == "cuda":            # the peak of the training steps, not of building (the plan models those)
        torch.cuda.reset_peak_memory_stats(device)
    x = images.to(dtype)
    parts = {"teacher_forward": [], "student_forward_backward": [], "optimizer": [], "step": []}
    for i in range(warmup + steps):
        t0 = _sync(device)
        target = teacher(x)
        t1 = _sync(device)
        pred, mask = engine(x)
        engine.backward(dbot_loss(pred, target, mask))
        t2 = _sync(device)
        engine.step()
        t3 = _sync(device)
        if i >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v)
    teacher.release()
    destroy_engine(engine)
    return parts


def time_baseline(cfg, depth: int, images: torch.Tensor, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Per-step seconds of the reference-style step: fp32 weights, autocast + GradScaler, unfused AdamW."""
    model_cfg = dataclasses.replace(cfg.model, compile=False)          # the reference does not compile
    with torch.device(device):
        student = build_student(model_cfg, seed=0).train()
        teacher = build_teacher(model_cfg, depth, final_norm=False)
    teacher.load_state_dict({k: v for k, v in student.encoder.state_dict().items() if k in teacher.state_dict()})
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(student, o.weight_decay), lr=1e-4, betas=(o.beta1, o.beta2),
                            foreach=False, fused=False)
    cuda = device.type == "cuda"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    x, times = images.float(), []
    for i in range(warmup + steps):
        t0 = _sync(device)
        with torch.autocast(device.type, dtype=amp_dtype):
            with torch.no_grad():
                target = teacher(x)
            pred, mask = student(x)
            loss = dbot_loss(pred, target, mask)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        t1 = _sync(device)
        if i >= warmup:
            times.append(t1 - t0)
    return times


def run(a: argparse.Namespace) -> dict:
    """Benchmark; every rank runs it, rank 0 reports."""
    from dbot_ds.distributed.groups import init_distributed
    rank, world, device = init_distributed()
    out = measure(a, world, device)
    return out if rank == 0 else {}


def measure(a: argparse.Namespace, world: int, device: torch.device) -> dict:
    """One benchmark case in an initialised process group (dbot-bench sweep calls this once per case)."""
    cfg = _config(a, world)
    depth = cfg.model.depth if a.teacher_depth == "full" else int(a.teacher_depth)
    gen = torch.Generator(device="cpu").manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    size = cfg.model.img_size
    from dbot_ds.data.augment import normalize
    images = normalize(torch.randint(0, 256, (a.micro_batch, 3, size, size), generator=gen, dtype=torch.uint8).to(device))
    left_before = free_memory(device)
    parts = time_ours(cfg, depth, images, world, device, a.steps, a.warmup)
    mem = _peak(device)
    med = {k: statistics.median(v) for k, v in parts.items()}
    flops = step_flops_per_image(cfg.model, depth, recompute=True)
    img_s = a.micro_batch / med["step"]
    peak, peak_name = _peak_tflops(a, device)
    tflops = img_s * flops["model"] / 1e12
    out = {"arch": a.arch, "img_size": size, "micro_batch": a.micro_batch, "world": world, "zero": a.zero,
           "act_ckpt_every": a.ckpt, "compile": a.compile, "teacher": a.teacher, "teacher_depth": depth, "precision": a.precision,
           "overrides": a.set, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "versions": _versions(),
           "img_per_s_per_gpu": img_s, "step_s": med["step"], "tflops_per_gpu": tflops, "peak_tflops": peak,
           "peak_source": peak_name, "mfu": tflops / peak, "gflops_per_image": flops["model"] / 1e9,
           "hardware_tflops_per_gpu": img_s * flops["hardware"] / 1e12, **mem, "allocated_before_gib": left_before,
           "split_s": {"teacher_forward": med["teacher_forward"], "student_forward_backward":
                       med["student_forward_backward"], "optimizer": med["optimizer"], "data_wait": 0.0},
           "steps": a.steps, "warmup": a.warmup}
    del parts
    free_memory(device)
    if a.baseline:
        try:
            base = statistics.median(time_baseline(cfg, depth, images, device, a.steps, a.warmup))
            out["baseline_img_per_s_per_gpu"] = a.micro_batch / base
            out["speedup"] = img_s / out["baseline_img_per_s_per_gpu"]
        except torch.OutOfMemoryError as e:       # the reference keeps fp32 weights: it may not fit where ours does
            out["baseline_error"] = f"out of memory at micro-batch {a.micro_batch}: {str(e).splitlines()[0]}"
        free_memory(device)
    return out


def summary(r: dict) -> str:
    s = r["split_s"]
    lines = [f"{r['arch']} {r['img_size']}px  micro-batch {r['micro_batch']}  x{r['world']}  {r['zero']}  ckpt "
             f"{r['act_ckpt_every']}  teacher {r['teacher']} depth {r['teacher_depth']}  on {r['device']}",
             f"  {r['img_per_s_per_gpu']:.1f} img/s/GPU  {r['tflops_per_gpu']:.1f} TFLOP/s/GPU  MFU "
             f"{100 * r['mfu']:.1f}% (peak {r['peak_tflops']} {r['peak_source']})  peak mem {r['peak_mem_gib']:.2f} GiB",
             f"  step {1e3 * r['step_s']:.1f} ms = teacher {1e3 * s['teacher_forward']:.1f} + student fwd/bwd "
             f"{1e3 * s['student_forward_backward']:.1f} + optimizer {1e3 * s['optimizer']:.1f} ms"]
    if "baseline_error" in r:
        lines.append(f"  baseline: {r['baseline_error']}")
    if "speedup" in r:
        lines.append(f"  baseline {r['baseline_img_per_s_per_gpu']:.1f} img/s/GPU -> speedup {r['speedup']:.2f}x")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> int:
    r = run(a)
    if r:
        print(summary(r))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(r, f, indent=1)
        print(json.dumps(r), flush=True)
    return 0
