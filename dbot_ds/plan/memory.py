"""dbot-plan: GPU memory of a dBOT step per rank, before any GPU time is spent.

    dbot-plan --arch vit_huge_patch14 --zero 2 --world 32 --micro-batch 128 --ckpt 0 --teacher replicated
    dbot-plan --arch vit_gigantic_patch14 --zero 3 --world 32 --micro-batch 64 --ckpt 1 --teacher zero3 --json
    dbot-plan --time --preset vit_h --card A100 --mfu 0.4 --world 8 32 64 128 256
    dbot-plan --time --preset vit_h --bench step.json --zero 3 --inter-gbps 50 --json

--time predicts the recipe's wall-clock instead (dbot_ds/timeplan.py): step time split into compute and the
ZeRO communication it does not hide, scaling efficiency and days for all stages, per world size.

The model is in bytes per rank, bf16 mixed precision as the trainer runs it:
- student weights 2 P (ZeRO-3: 2 P / W plus the gathered working set), gradients 2 P (ZeRO-2/3: 2 P / W plus
  DeepSpeed's bucket), AdamW fp32 master + 2 moments 12 P (ZeRO-1/2/3: / W; offloaded: 0);
- teacher 2 Pt (zero3 placement: 2 Pt / W plus one gathered block);
- activations from the architecture: a pre-norm block with fused (flash) attention keeps about
  s h (16 + 4 r) bytes per image (s tokens, width h, MLP ratio r: LN and linear inputs, Q/K/V/O, the MLP's
  hidden input and GELU output, all bf16); a checkpointed block keeps only its 2 s h input. On top of what the
  forward keeps comes the largest transient of the backward's phases, which run one at a time: the fp32 loss
  tensors over all tokens, or one block's largest gradients (and, checkpointed, its recomputed activations);
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

from dbot_ds.config import ARCHS, Config, ModelConfig, load_config, zero_name
from dbot_ds.model.flops import PEAK_TFLOPS, step_flops_per_image
from dbot_ds.model.vit import Student, build_teacher

from . import timeplan
from .stages import make_plan

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


def _stack_bytes(depth: int, tokens: int, width: int, mlp_ratio: float, ckpt_every: int) -> tuple[float, float]:
    """(bytes a stack keeps from its forward to its backward, bytes its backward adds at its peak) per image."""
    if not depth:
        return 0.0, 0.0
    full = block_activation_bytes(tokens, width, mlp_ratio)
    ckpt = len(range(0, depth, ckpt_every)) if ckpt_every else 0
    kept = ckpt * 2 * tokens * width + (depth - ckpt) * full
    # While a block's backward runs: the gradients of its largest activations (the MLP's hidden, before and
    # after GELU: 2 x 2 s h r bytes, about half of what the block keeps), plus, if it is checkpointed, its
    # recomputed activations.
    return kept, full * (1.5 if ckpt else 0.5)


def activation_bytes_per_image(cfg: ModelConfig, ckpt_every: int) -> float:
    """Activation memory per image at the step's peak (student): what the forward keeps for the backward, plus
    the largest transient of any one phase of the backward, since the phases run one after another (the loss's
    fp32 tensors, a decoder block's, an encoder block's). Checked against torch's MemTracker on CPU (tests)."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    k = 1 + int(n * (1 - cfg.mask_ratio))
    enc_kept, enc_peak = _stack_bytes(cfg.depth, k, cfg.embed_dim, cfg.mlp_ratio, ckpt_every)
    dec_kept, dec_peak = _stack_bytes(cfg.decoder_depth, n + 1, cfg.decoder_embed_dim, cfg.mlp_ratio, ckpt_every)
    embed = 2 * n * cfg.embed_dim + 2 * k * cfg.embed_dim                 # all patch tokens, visible gather
    head = 2 * (n + 1) * (cfg.decoder_embed_dim + 2 * cfg.embed_dim)        # decoder input, predictions, targets
    loss = 5 * 4 * (n + 1) * cfg.embed_dim                                  # fp32 pred, target, standardised, diff, loss
    images = (2 + 1) * 3 * cfg.img_size**2                                  # bf16 input + uint8 batch
    return enc_kept + dec_kept + embed + head + images + max(loss, dec_peak, enc_peak)


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


IMAGENET_1K = 1_281_167


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dbot-plan", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="default vit_huge_patch14; with --time: the preset's")
    p.add_argument("--zero", type=zero_name, default="zero2", choices=["zero0", "zero1", "zero2", "zero3", "zero3_offload"],
                   help="ZeRO stage: 0-3 or zero0..zero3, zero3_offload (sets --offload), as dbot-bench spells it")
    p.add_argument("--world", type=int, nargs="+", default=None,
                   help="ranks (GPUs) in total; default 32; with --time a list, default 8 32 64 128 256")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="images per GPU per forward; default 128; with --time the preset's (the largest tried)")
    p.add_argument("--ckpt", type=int, default=0, help="activation checkpointing: 0 off, 1 all, k every k-th block")
    p.add_argument("--teacher", default="replicated", choices=["replicated", "zero3"])
    p.add_argument("--teacher-depth", type=int, default=None, help="default: the student's depth (stage >= 1)")
    p.add_argument("--offload", action="store_true", help="optimizer states in CPU memory (zero3_offload)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    t = p.add_argument_group("--time: wall-clock of a recipe (dbot_ds/timeplan.py)")
    t.add_argument("--time", action="store_true", help="predict step time, scaling and days instead of memory")
    t.add_argument("--preset", default="vit_h", help="the recipe: global batch, stages, stage-0 teacher depth")
    t.add_argument("--num-samples", type=int, default=None,
                   help=f"images per epoch; default the preset's data.num_samples, else {IMAGENET_1K:,} (ImageNet-1K)")
    t.add_argument("--bench", default=None, help="a `dbot-bench step --json` file: its measured img/s per GPU")
    t.add_argument("--card", default=None, choices=sorted(PEAK_TFLOPS), help="the GPU, for compute at --mfu "
                   "(without --bench) and the default fabric")
    t.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed with --card")
    t.add_argument("--gpus-per-node", type=int, default=8)
    t.add_argument("--nvlink-gbps", type=float, default=None,
                   help="intra-node GB/s per GPU per direction; default from the card: A100 300, H100/H200 450")
    t.add_argument("--inter-gbps", type=float, default=None, help="inter-node GB/s per GPU (its NIC); default from "
                   "the card: A100 25 (200 Gb/s HDR), H100/H200 50 (400 Gb/s NDR)")
    t.add_argument("--overlap", type=float, default=timeplan.DEFAULT_OVERLAP,
                   help="fraction of the overlappable communication hidden behind compute (README: why 0.5)")
    return p.parse_args(argv)


def memory_cli(a: argparse.Namespace) -> int:
    worlds = a.world or [32]
    if len(worlds) != 1:
        raise SystemExit("dbot-plan: the memory plan takes one --world; a list of world sizes goes with --time")
    a.world, a.arch = worlds[0], a.arch or "vit_huge_patch14"
    a.micro_batch = a.micro_batch or 128
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


def _time_config(a: argparse.Namespace) -> Config:
    given = {"model.arch": a.arch, "model.img_size": a.img_size, "optim.micro_batch": a.micro_batch}
    cfg = load_config(preset=a.preset, overrides=[f"{k}={v}" for k, v in given.items() if v])
    if cfg.teacher.source != "bootstrap":
        raise SystemExit(f"dbot-plan --time: preset {a.preset} distils from a {cfg.teacher.source} teacher; the time "
                         "model covers the bootstrapped recipe (teacher = the student's architecture)")
    return cfg


def time_recipe(cfg: Config, zero: int, teacher: str, num_samples: int) -> timeplan.Recipe:
    """The preset's stages (as the trainer plans them: epochs x num_samples // global_batch steps) with each stage's
    FLOPs per image and teacher size, and the student's parameter count."""
    stage_plan = make_plan(cfg, num_samples // cfg.optim.global_batch)
    stages, student = [], 0
    for steps, depth in zip(stage_plan.lengths, stage_plan.teacher_depths):
        student, teacher_params, _ = param_counts(cfg.model, depth)
        flops = step_flops_per_image(cfg.model, depth)["model"]
        stages.append(timeplan.Stage(steps, depth, flops, teacher_params))
    return timeplan.Recipe(cfg.optim.global_batch, cfg.optim.micro_batch, tuple(stages), student, zero,
                           teacher == "zero3")


def _compute(a: argparse.Namespace, cfg: Config) -> tuple[float, dict]:
    """Achieved model FLOP/s per GPU, and where it came from."""
    if a.bench:
        with open(a.bench) as f:
            bench = json.load(f)
        if (bench["arch"], bench["img_size"]) != (cfg.model.arch, cfg.model.img_size):
            raise SystemExit(f"dbot-plan --time: {a.bench} timed {bench['arch']} at {bench['img_size']} px, the recipe "
                             f"trains {cfg.model.arch} at {cfg.model.img_size} px; bench that, or pass --arch")
        rate = timeplan.flops_per_s_from_bench(bench)
        return rate, {"source": a.bench, "device": bench.get("device"), "bench_world": bench.get("world"),
                      "bench_micro_batch": bench.get("micro_batch"), "mfu": bench.get("mfu")}
    if not a.card:
        raise SystemExit("dbot-plan --time needs the compute: --bench FILE (from dbot-bench step --json) or --card")
    return timeplan.flops_per_s_from_card(PEAK_TFLOPS[a.card], a.mfu), {"source": "card", "card": a.card, "mfu": a.mfu}


def _fabric(a: argparse.Namespace, compute: dict) -> timeplan.Fabric:
    """--nvlink-gbps / --inter-gbps, else the card's (--card, or the bench's device name), else a DGX A100's."""
    device = (a.card or compute.get("device") or "").upper()
    card = next((c for c in timeplan.FABRICS if c in device), "A100")
    base = timeplan.FABRICS[card]
    return timeplan.Fabric(a.nvlink_gbps or base.nvlink_gbps, a.inter_gbps or base.inter_gbps, a.gpus_per_node)


def time_cli(a: argparse.Namespace) -> int:
    if a.zero not in ("zero2", "zero3"):
        raise SystemExit(f"dbot-plan --time models ZeRO-2 and ZeRO-3, not {a.zero} (offload adds CPU optimizer time)")
    cfg = _time_config(a)
    num_samples = a.num_samples or cfg.data.num_samples or IMAGENET_1K
    recipe = time_recipe(cfg, int(a.zero[4]), a.teacher, num_samples)
    rate, compute = _compute(a, cfg)
    fabric = _fabric(a, compute)
    worlds = a.world or [8, 32, 64, 128, 256]
    try:
        rows = timeplan.scaling_table(recipe, worlds, fabric, rate, a.overlap)
    except ValueError as e:                   # a world size that does not divide the global batch, a bad overlap
        raise SystemExit(f"dbot-plan --time: {e}") from None
    out = {"preset": a.preset, "arch": cfg.model.arch, "img_size": cfg.model.img_size, "zero": recipe.zero,
           "teacher": a.teacher, "global_batch": recipe.global_batch, "num_samples": num_samples,
           "student_params": recipe.student_params, "tflops_per_gpu": rate / 1e12, "compute": compute,
           "fabric": vars(fabric), "overlap": a.overlap,
           "stages": [{"steps": s.steps, "teacher_depth": s.teacher_depth, "gflops_per_image": s.flops_per_image / 1e9}
                      for s in recipe.stages],
           "worlds": rows}
    if not a.json:
        print(time_summary(out, recipe))
    print(json.dumps(out))
    return 0


def time_summary(out: dict, recipe: timeplan.Recipe) -> str:
    f, c = out["fabric"], out["compute"]
    stages = ", ".join(f"stage {i} {s['steps']:,} steps at {s['gflops_per_image']:.1f} GFLOP/img (teacher depth "
                       f"{s['teacher_depth']})" for i, s in enumerate(out["stages"]))
    where = f"{c['card']} at MFU {c['mfu']:.2f}" if c["source"] == "card" else f"measured in {c['source']}"
    colls = ", ".join(f"{k.name} {k.nbytes / 1e9:.2f} GB{' x accum' if k.per_micro_step else ''}"
                      for k in timeplan.collectives(recipe, recipe.stages[-1]))
    lines = [f"{out['preset']}: {out['arch']} {out['img_size']}px, global batch {out['global_batch']}, {stages}",
             f"  ZeRO-{out['zero']}, teacher {out['teacher']}; compute {out['tflops_per_gpu']:.1f} model TFLOP/s per "
             f"GPU ({where}); fabric NVLink {f['nvlink_gbps']:g} GB/s, inter-node {f['inter_gbps']:g} GB/s per GPU, "
             f"{f['gpus_per_node']} GPUs/node; overlap {out['overlap']:.2f}",
             f"  per GPU per optimizer step (buffers; a ring sends (W-1)/W of each): {colls}",
             f"  {'W':>5} {'micro':>5} {'accum':>5} {'stage':>5} {'compute s':>9} {'comm s':>8} {'exposed s':>9} "
             f"{'step s':>8} {'img/s':>8} {'eff':>5} {'days':>7}"]
    for r in out["worlds"]:
        for s in r["stages"]:
            days = s["steps"] * s["step_s"] / timeplan.SECONDS_PER_DAY
            lines.append(f"  {r['world']:>5} {r['micro_batch']:>5} {r['accum']:>5} {s['stage']:>5} "
                         f"{s['compute_s']:>9.3f} {s['comm_s']:>8.4f} {s['exposed_comm_s']:>9.4f} {s['step_s']:>8.3f} "
                         f"{s['img_per_s']:>8.0f} {s['efficiency']:>5.2f} {days:>7.2f}")
        lines.append(f"  {r['world']:>5} GPUs: {r['days']:.2f} days for the recipe ({r['compute_days']:.2f} compute "
                     f"only), scaling efficiency {r['efficiency']:.2f} vs {out['worlds'][0]['world']} GPUs")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return time_cli(a) if a.time else memory_cli(a)


if __name__ == "__main__":
    sys.exit(cli())
