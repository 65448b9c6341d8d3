"""`dbot-bench data` (our loader against the ImageFolder reference: the run, its summary and JSON record) and
`dbot-bench fixture` (the real-photo image set it is run on); both subcommands' arguments."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import PIL
import torch
import torchvision
import webdataset as wds
from PIL import features

from dbot_ds.data.augment import Augment

from .loaders import _device, bench_baseline, bench_ours, extract_to_folders
from .profile import profile_stages

# ------------------------------------------------------------------------------------------- report

def _environment() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "webdataset": wds.__version__,
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")), "python": platform.python_version()}


def run_data_bench(args: argparse.Namespace) -> dict:
    """Both benchmarks (and optionally the profile); returns the result record."""
    common = dict(workers=args.workers, batch=args.batch, img_size=args.img_size, warmup=args.warmup,
                  steps=args.steps)
    augment = Augment(tuple(args.crop_scale), args.hflip, args.interpolation, args.color_jitter).check()
    result = {**common, "shards": args.shards, **_environment(), "augment": augment._asdict(),
              "normalize_device": "skipped" if args.skip_normalize else str(_device())}
    if args.profile:
        result["profile_ms_per_img"] = profile_stages(args.shards, img_size=args.img_size, batch=args.batch)
    processes = max(args.workers, 1)  # with 0 workers everything runs in the main process
    skipped = [0]
    result["teacher_size"] = args.teacher_size
    result["img_per_s"] = bench_ours(args.shards, **common, normalized=not args.skip_normalize, augment=augment,
                                     skipped=skipped, teacher_size=args.teacher_size)
    result["skipped"] = skipped[0]
    result["img_per_s_per_worker"] = result["img_per_s"] / processes
    if not args.no_baseline:
        with tempfile.TemporaryDirectory(prefix="dbot-bench-") as tmp:
            root = args.baseline_dir
            if root is None:  # not timed
                root = os.path.join(tmp, "files")
                result["baseline_extracted_images"] = extract_to_folders(args.shards, root)
            result["baseline_dir"] = args.baseline_dir
            skipped = [0]
            result["baseline_img_per_s"] = bench_baseline(root, **common, augment=augment, skipped=skipped)
            result["baseline_skipped"] = skipped[0]
        result["baseline_img_per_s_per_worker"] = result["baseline_img_per_s"] / processes
        result["speedup"] = result["img_per_s_per_worker"] / result["baseline_img_per_s_per_worker"]
    return result


_NORMALIZE_NOTE = {
    "cpu": "our normalize on the CPU (no GPU here; the trainer runs it on the GPU)",
    "skipped": "our normalize skipped (loader alone; the baseline still normalises in its workers)",
}


def _summary(r: dict) -> str:
    views = f" + the teacher's {r['teacher_size']} px view" if r.get("teacher_size") else ""
    lines = [f"data loader benchmark: {r['workers']} workers, batch {r['batch']}, {r['img_size']} px{views}, "
             f"{r['steps']} timed steps after {r['warmup']} warm-up; {r['cpu_count']} CPUs; "
             + _NORMALIZE_NOTE.get(r["normalize_device"], f"our normalize on {r['normalize_device']}"),
             f"  ours (webdataset shards):             {r['img_per_s']:8.1f} img/s, "
             f"{r['img_per_s_per_worker']:7.1f} per worker, {r['skipped']} unreadable images skipped"]
    if "baseline_img_per_s" in r:
        lines += [f"  baseline (ImageFolder + torchvision): {r['baseline_img_per_s']:8.1f} img/s, "
                  f"{r['baseline_img_per_s_per_worker']:7.1f} per worker, {r['baseline_skipped']} unreadable "
                  "images skipped",
                  f"  speedup per worker: {r['speedup']:.2f}x"]
    for name, ms in r.get("profile_ms_per_img", {}).items():
        lines.append(f"  profile {name:30s} {ms:7.3f} ms/img")
    return "\n".join(lines)


def _cmd_data(args: argparse.Namespace) -> int:
    result = run_data_bench(args)
    print(_summary(result))
    line = json.dumps(result, sort_keys=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 0


def _cmd_fixture(args: argparse.Namespace) -> int:
    from .fixtures import fixture_paths, write_photo_fixture  # needs scikit-image

    manifest = write_photo_fixture(args.out, args.num, seed=args.seed)
    pattern, folder = fixture_paths(args.out)
    print(f"wrote {manifest['num_samples']} real-photo JPEGs in {len(manifest['shards'])} shards to {args.out}")
    print(f"shard pattern: data.shards='{pattern}'")
    print(f"class folders: {folder}")
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("data", help="data loader throughput: ours vs ImageFolder + torchvision")
    p.add_argument("--shards", required=True, help="webdataset shard pattern, e.g. 'DIR/shard-{000000..000004}.tar'")
    p.add_argument("--workers", type=int, required=True, help="DataLoader worker processes (0: in-process)")
    p.add_argument("--steps", type=int, required=True, help="timed batches")
    p.add_argument("--batch", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--img-size", type=int, default=224, help="output side in px (default 224)")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (default 5)")
    p.add_argument("--baseline-dir", help="class-folder tree with the same images (default: extract the shards)")
    p.add_argument("--no-baseline", action="store_true", help="time only our loader")
    p.add_argument("--skip-normalize", action="store_true",
                   help="time our loader without normalize (what it delivers when a GPU normalises)")
    p.add_argument("--profile", action="store_true", help="also print ms/img per pipeline stage (in-process)")
    p.add_argument("--json", help="also write the JSON result to this file")
    p.add_argument("--teacher-size", type=int, default=0,
                   help="also cut the teacher's view at this size from each crop (teacher.input_size; 0: none)")
    default = Augment()
    p.add_argument("--crop-scale", type=float, nargs=2, default=list(default.crop_scale), metavar=("MIN", "MAX"),
                   help="as data.crop_scale (default 0.2 1.0)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=default.hflip,
                   help="as data.hflip (default on)")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), default=default.interpolation,
                   help="as data.interpolation")
    p.add_argument("--color-jitter", type=float, default=default.color_jitter,
                   help="as data.color_jitter (default 0: off; the CLIP presets use 0.4)")
    p.set_defaults(func=_cmd_data)


def add_fixture_command(commands) -> None:
    p = commands.add_parser("fixture", help="ImageNet-like JPEGs from real photos, as shards and class folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_fixture)
