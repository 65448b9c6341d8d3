"""`dbot-bench fp8`: may the frozen teacher run its Linear layers in FP8 (e4m3, `dbot_ds.model.fp8`)? Parity, speed, loss.

    dbot-bench fp8 --arch vit_base_patch16 --micro-batch 128 --train-batch 32 --fp32-run   # H100 (or Ada)
    dbot-bench fp8 --arch vit_huge_patch14 --micro-batch 128 --train-batch 16 --images 128
    dbot-bench fp8 --weights exports/vit_b_stage0 --micro-batch 128 --train-batch 32     # a trained teacher
    python -m dbot_ds.bench.fp8 --arch vit_tiny_patch4 --steps 5 --micro-batch 4 --images 8   # CPU smoke test
    (`python -m dbot_ds.bench.fp8 ARGS` is the same as `dbot-bench fp8 ARGS`.)

Three measurements, on the GPU if there is one (FP8 needs compute capability >= 8.9), else on the CPU (torch's
reference FP8 matmul: parity and loss are meaningful there, speed is not):

a. Target parity on real images: `--images` random resized crops of the photos bundled with scikit-image
   (`bench_fixtures.load_photos`), normalised as in training. The teacher (`build_teacher`, full depth, bf16
   weights; the student's random init, as at stage 0/1, or an export folder `--weights`) gives bf16 targets; a deep
   copy through `to_fp8` gives fp8 targets; the same weights in fp32 give a reference that puts bf16's own error
   beside fp8's. Per-token cosine (mean, min, 0.1% quantile) of the raw targets and of the per-token standardised
   targets the loss sees (`objective.standardize_tokens`), max abs differences, and the SmoothL1 that the fp8
   targets alone would score against the bf16 ones.
b. Speed: the teacher forward at `--micro-batch`, bf16 vs fp8 (fused activation quantisation on CUDA) vs fp8 with
   eager quantisation; `--compile` adds both with every block compiled. Median of `--iters` after `--warmup`.
   `--layers fc1,fc2` converts only the MLP (2/3 of the block FLOPs), the accuracy/speed middle ground.
c. Loss curve: `--steps` plain PyTorch training steps (no DeepSpeed: `build_student`, `dbot_loss`, AdamW, fp32
   weights under bf16 autocast) from one student init on the same batches and masks (seeded), once with bf16 targets
   and once with fp8 targets (`--fp32-run`: once more with fp32 targets, the change the project already accepted
   as harmless, to scale the fp8 difference). The teacher is, as at a stage start, the full-depth encoder holding
   the student's initial encoder weights (or `--weights`).

The verdict uses the bar set for offering FP8: a per-token cosine > 0.999 of the raw and of the standardised
targets, taken at the 0.1% quantile over all tokens (the mean and min are reported too), and smoothed loss curves
within `--loss-tol` (relative, default 2%: a judgment call; `--fp32-run` shows the scale of an accepted change).
The last output line is one JSON object (`--json` also writes it).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from dbot_ds.config import load_config
from dbot_ds.data.augment import normalize
from dbot_ds.model import fp8 as fp8lib
from dbot_ds.model.fp8 import Fp8Linear, to_fp8
from dbot_ds.model.vit import build_student, build_teacher, compile_blocks, teacher_state_from_student

from .fp8_inputs import photo_crops, read_export, save_photos
from .fp8_measure import compare_curves, target_parity, time_forward, train_curve

COSINE_BAR = 0.999          # per-token cosine the fp8 targets must keep (0.1% quantile, standardised targets)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, help="model.arch (default vit_base_patch16; with --weights: the export's)")
    p.add_argument("--img-size", type=int, default=None, help="model.img_size (default: the arch's)")
    p.add_argument("--micro-batch", type=int, default=64, help="images per teacher forward (parity and speed)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="images per loss-curve step (default: micro-batch, at most 32, which keeps ViT-H's "
                        "curves to seconds and its fp32 student + AdamW small beside the three teachers)")
    p.add_argument("--steps", type=int, default=200, help="training steps per loss curve (0: no loss curves)")
    p.add_argument("--warmup", type=int, default=5, help="untimed teacher forwards before timing")
    p.add_argument("--iters", type=int, default=20, help="timed teacher forwards (median reported)")
    p.add_argument("--images", type=int, default=256, help="real-image crops for the parity measurement")
    p.add_argument("--pool", type=int, default=256, help="real-image crops the training batches are drawn from")
    p.add_argument("--weights", default=None,
                   help="teacher weights: a dbot-export folder (encoder.safetensors + encoder.json) or one of its files")
    p.add_argument("--final-norm", action="store_true",
                   help="teacher with its final LayerNorm (teacher.final_norm; default off, as the reference)")
    p.add_argument("--lr", type=float, default=1.5e-4, help="AdamW learning rate of the loss curves (after warmup)")
    p.add_argument("--lr-warmup", type=int, default=10, help="linear LR warmup steps of the loss curves")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window over the loss curves")
    p.add_argument("--loss-tol", type=float, default=0.02,
                   help="largest relative difference of the smoothed loss curves counted as matching")
    p.add_argument("--fp32-run", action="store_true", help="a third loss curve with fp32 targets, for scale")
    p.add_argument("--compile", action="store_true", help="also time both teachers with every block compiled")
    p.add_argument("--fast-accum", action="store_true", help="_scaled_mm use_fast_accum (faster, less exact)")
    p.add_argument("--no-fuse-quant", action="store_true",
                   help="CUDA: quantise activations eagerly instead of with the compiled kernel (no torch.compile)")
    p.add_argument("--layers", default="qkv,proj,fc1,fc2",
                   help="Linear layers of each block to run in fp8, by name (e.g. fc1,fc2: the MLP only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", default=None, help="folder of real photos (default: scikit-image's bundled ones)")
    p.add_argument("--save-photos", default=None, metavar="DIR",
                   help="only write scikit-image's photos into DIR as PNGs (for --photos where it is not installed)")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="any other config override (repeatable)")


def add_command(commands) -> None:
    p = commands.add_parser("fp8", help="FP8 teacher forward: target parity, speed, loss curve (see bench_fp8.py)")
    add_arguments(p)
    p.set_defaults(func=main)


def _config(a: argparse.Namespace, info: dict | None):
    arch = a.arch or (info["arch"] if info else "vit_base_patch16")
    over = ["schedule.stage_steps=[1]", f"model.arch={arch}", f"optim.micro_batch={a.micro_batch}",
            f"optim.global_batch={a.micro_batch}"]
    if info:     # the export's shape wins over the arch preset (a custom width/heads/patch trained on top of one)
        over += [f"model.{k}={info[k]}" for k in ("img_size", "patch_size", "embed_dim", "num_heads", "mlp_ratio")]
    if a.img_size:
        over.append(f"model.img_size={a.img_size}")
    return load_config(overrides=over + a.set)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# ----------------------------------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, info = read_export(a.weights) if a.weights else (None, None)
    cfg = _config(a, info)
    m = cfg.model
    depth = int(info["depth"]) if info else m.depth
    final_norm = a.final_norm and (info is None or bool(info.get("final_norm")))
    train_batch = a.train_batch or min(a.micro_batch, 32)
    fp8lib.check_supported(device)            # before minutes of set-up: a GPU below capability 8.9 has no FP8
    torch.manual_seed(a.seed)

    with torch.device(device):         # initialise on the device: ViT-H's init takes seconds on a CPU
        student = build_student(m, seed=a.seed)
        teacher32 = build_teacher(m, depth, final_norm)
    init = {k: v.detach().clone() for k, v in student.state_dict().items()}
    enc = {k.removeprefix("encoder."): v for k, v in init.items() if k.startswith("encoder.")}
    teacher32.load_state_dict(teacher_state_from_student(state if state is not None else enc, teacher32))
    teacher16 = copy.deepcopy(teacher32).to(torch.bfloat16)           # the run's teacher: bf16 weights
    teacher8 = copy.deepcopy(teacher16)
    t0 = time.perf_counter()
    layers = [n for n in a.layers.split(",") if n]
    converted = to_fp8(teacher8, fast_accum=a.fast_accum, layers=layers, fuse_quant=not a.no_fuse_quant)
    fp8_layers = sum(isinstance(x, Fp8Linear) for x in teacher8.modules())
    linear_left = [n for n, x in teacher8.named_modules() if type(x) is torch.nn.Linear]
    conv_s = time.perf_counter() - t0

    out = {"bench": "fp8", "arch": m.arch, "img_size": m.img_size, "patch_size": m.patch_size,
           "embed_dim": m.embed_dim, "depth": depth, "final_norm": final_norm,
           "weights": a.weights or "random init (the student's initial encoder)",
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
           "torch": torch.__version__, "micro_batch": a.micro_batch, "train_batch": train_batch, "seed": a.seed,
           "fp8": {"converted": converted, "fp8_layers": fp8_layers, "linear_left_bf16": linear_left,
                   "layers": layers, "fast_accum": a.fast_accum, "convert_s": conv_s,
                   "teacher_mib_bf16": _bytes(teacher16) / 2**20, "teacher_mib_fp8": _bytes(teacher8) / 2**20}}

    # a. parity on real images
    images = photo_crops(a.images, m.img_size, a.seed, a.photos)
    out["parity"] = target_parity({"bf16": teacher16, "fp8": teacher8, "fp32": teacher32}, images, a.micro_batch,
                                  device)

    # b. speed
    x = normalize(photo_crops(a.micro_batch, m.img_size, a.seed + 1, a.photos).to(device), torch.bfloat16)
    speed = {"bf16": time_forward(teacher16, x, a.warmup, a.iters, device),
             "fp8": time_forward(teacher8, x, a.warmup, a.iters, device)}
    eager = copy.deepcopy(teacher8)
    for mod in eager.modules():
        if isinstance(mod, Fp8Linear):
            mod.fuse_quant = False
    speed["fp8_eager_quant"] = time_forward(eager, x, a.warmup, a.iters, device)
    del eager
    if a.compile:
        for name, model in (("bf16", teacher16), ("fp8", teacher8)):
            compiled = compile_blocks(copy.deepcopy(model))
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(x)
            speed[f"{name}_compiled"] = time_forward(compiled, x, a.warmup, a.iters, device)
            speed[f"{name}_compiled"]["compile_s"] = time.perf_counter() - t0
            del compiled
    base = speed["bf16"]["img_per_s"]
    for v in speed.values():
        v["speedup_vs_bf16"] = v["img_per_s"] / base
    if a.compile:
        speed["fp8_compiled"]["speedup_vs_bf16_compiled"] = (speed["fp8_compiled"]["img_per_s"]
                                                             / speed["bf16_compiled"]["img_per_s"])
    out["speed"] = speed
    out["fp8"]["fused_quant"] = ("n/a (cpu: eager)" if device.type != "cuda" else "off" if a.no_fuse_quant else
                                 f"eager ({fp8lib.fused_quant_error})" if fp8lib.fused_quant_error else "compiled")
    out["speedup"] = speed["fp8"]["speedup_vs_bf16"]

    # c. loss curves from one init, same batches and masks
    if a.steps > 0:
        pool = photo_crops(a.pool, m.img_size, a.seed + 2, a.photos)
        t0 = time.perf_counter()
        runs = [("bf16", teacher16, torch.bfloat16), ("fp8", teacher8, torch.bfloat16)]
        if a.fp32_run:
            runs.append(("fp32", teacher32, torch.float32))
        curves, step_s = {}, {}
        for name, teacher, dtype in runs:
            curves[name], step_s[name] = train_curve(student, init, teacher, dtype, pool, a, train_batch, device, cfg)
        loss = {"steps": a.steps, "lr": a.lr, "smooth": a.smooth, "seconds": time.perf_counter() - t0,
                "median_step_s": step_s, "step_speedup_fp8": step_s["bf16"] / step_s["fp8"],
                "curves": curves, "fp8_vs_bf16": compare_curves(curves["fp8"], curves["bf16"], a.smooth)}
        if a.fp32_run:
            loss["fp32_vs_bf16"] = compare_curves(curves["fp32"], curves["bf16"], a.smooth)
        out["loss"] = loss

    par = out["parity"]["fp8_vs_bf16"]
    verdict = {"cosine_bar": COSINE_BAR, "parity_ok": par["cos_std"]["q001"] > COSINE_BAR and
               par["cos_raw"]["q001"] > COSINE_BAR}
    if a.steps > 0:
        verdict["loss_tol"] = a.loss_tol
        verdict["loss_ok"] = out["loss"]["fp8_vs_bf16"]["max_rel_diff_smoothed"] <= a.loss_tol
    verdict["faster"] = out["speedup"] > 1.0
    out["verdict"] = verdict
    out["wall_s"] = time.perf_counter() - start
    return out


def summary(r: dict) -> str:
    p, f = r["parity"], r["fp8"]
    fb, bf = p["fp8_vs_bf16"], p["bf16_vs_fp32"]
    lines = [f"{r['arch']} {r['img_size']}px depth {r['depth']} on {r['device']}: {f['converted']} Linear layers in "
             f"fp8 ({f['teacher_mib_bf16']:.0f} -> {f['teacher_mib_fp8']:.0f} MiB), weights: {r['weights']}",
             f"  parity ({p['images']} real crops, {p['tokens']} tokens), per-token cosine mean/min/q0.1%:",
             f"    fp8 vs bf16  raw {fb['cos_raw']['mean']:.6f}/{fb['cos_raw']['min']:.6f}/{fb['cos_raw']['q001']:.6f}"
             f"  standardised {fb['cos_std']['mean']:.6f}/{fb['cos_std']['min']:.6f}/{fb['cos_std']['q001']:.6f}"
             f"  max|diff| {fb['max_abs_diff_raw']:.4g} (targets up to {p['target_absmax_bf16']:.4g})  rel L2 "
             f"{100 * fb['rel_l2_raw']:.2f}%",
             f"    bf16 vs fp32 raw {bf['cos_raw']['mean']:.6f}/{bf['cos_raw']['min']:.6f}/{bf['cos_raw']['q001']:.6f}"
             f"  standardised {bf['cos_std']['mean']:.6f}/{bf['cos_std']['min']:.6f}/{bf['cos_std']['q001']:.6f}"
             f"  rel L2 {100 * bf['rel_l2_raw']:.2f}%"]
    s = r["speed"]
    lines.append("  teacher forward, micro-batch %d: " % r["micro_batch"] + ", ".join(
        f"{k} {v['img_per_s']:.1f} img/s ({v['speedup_vs_bf16']:.2f}x)" for k, v in s.items()))
    if "loss" in r:
        lo, c = r["loss"], r["loss"]["fp8_vs_bf16"]
        lines.append(f"  loss over {lo['steps']} steps: final bf16 {c['final_ref']:.5f} fp8 {c['final']:.5f} "
                     f"(rel {c['final_rel_diff']:.2e}); smoothed curves max rel diff {c['max_rel_diff_smoothed']:.2e}, "
                     f"first step diff {c['first_step_diff']:.2e}")
        ms = {k: 1e3 * v for k, v in lo["median_step_s"].items()}
        lines.append(f"    plain-loop step (train batch {r['train_batch']}): with the bf16 teacher {ms['bf16']:.1f} ms, "
                     f"with the fp8 teacher {ms['fp8']:.1f} ms ({lo['step_speedup_fp8']:.2f}x)")
        if "fp32_vs_bf16" in lo:
            c = lo["fp32_vs_bf16"]
            lines.append(f"    for scale, fp32 vs bf16 targets: final rel {c['final_rel_diff']:.2e}, smoothed max rel "
                         f"{c['max_rel_diff_smoothed']:.2e}, first step diff {c['first_step_diff']:.2e}")
    lines.append(f"  verdict: {r['verdict']}  ({r['wall_s']:.0f} s)")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> int:
    if a.save_photos:
        print(f"wrote {len(save_photos(a.save_photos))} photos to {a.save_photos}")
        return 0
    if min(a.micro_batch, a.images, a.iters, a.pool) < 1 or min(a.steps, a.warmup) < 0 or (a.train_batch or 1) < 1:
        raise SystemExit("need --micro-batch, --images, --iters, --pool, --train-batch >= 1 and --steps, --warmup >= 0")
    r = run(a)
    print(summary(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r), flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m dbot_ds.bench.fp8 ...`: the same as `dbot-bench fp8 ...`."""
    p = argparse.ArgumentParser(prog="dbot-bench fp8", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
