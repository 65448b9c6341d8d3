r"""`dbot-bench`: throughput benchmarks for dbot-ds.

    dbot-bench fixture --out /tmp/benchfix --num 1200
    dbot-bench data --shards '/tmp/benchfix/shard-{000000..000004}.tar' --baseline-dir /tmp/benchfix/files \
        --workers 2 --steps 20 --batch 64
    dbot-bench step --arch vit_huge_patch14 --micro-batch 128 --zero zero2 --baseline     # see bench_step.py
    dbot-bench mix --out /tmp/benchmix --classes 20 --per-class 1000                      # class mixing
    dbot-bench monitor --steps 64 --every 16                                              # see bench_monitor.py
    dbot-bench repro --out /tmp/repro --seeds 0 1 2                                      # see bench_repro.py

`data` times our webdataset loader (:func:`dbot_ds.data.build_train_loader` + :func:`~dbot_ds.data.normalize`)
against the usual torchvision ImageFolder + DataLoader pipeline on the same JPEGs, with the same augmentation
(the data.* keys as flags), and prints a summary whose last line is one JSON object. Both sides skip unreadable
images and report how many they skipped.

`mix` writes class-sorted shards (one class per shard, as a plain tar per class gives) and reports the mean
number of distinct classes per micro-batch our loader delivers, for each `--open-shards` value.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import webdataset as wds
from PIL import Image, features
from torchvision import datasets, transforms
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from dbot_ds.data import (IMAGE_KEYS, IMAGENET_MEAN, IMAGENET_STD, Augment, build_train_loader, expand_shards,
                          normalize)
from dbot_ds.epochs import DEFAULT_OPEN_SHARDS

CROP_SCALE = Augment().crop_scale      # the profile's fixed setting (the bootstrapped recipe's)


# ------------------------------------------------------------------------------------------- timing

def _device() -> torch.device:
    """Where batches are normalised: the GPU as in the trainer, else (this benchmark on a CPU box) the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timed(batches: Iterator, consume: Callable[[object], int], warmup: int, steps: int) -> float:
    """Images per second (wall clock) over ``steps`` batches, after ``warmup`` untimed ones.

    ``consume(batch)`` finishes one batch (e.g. normalises it) and returns its number of images.
    """
    for _ in range(warmup):
        consume(next(batches))
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += consume(next(batches))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def bench_ours(pattern: str, *, workers: int, batch: int, img_size: int, warmup: int, steps: int,
               seed: int = 0, normalized: bool = True, augment: Augment = Augment(),
               skipped: list[int] | None = None) -> float:
    """img/s of build_train_loader (decode + crop in workers, uint8 batches) + normalize on :func:`_device`
    (``normalized=False``: the loader alone, i.e. what the workers deliver when a GPU does the normalising).
    Unreadable samples the loader skipped are added to ``skipped[0]``."""
    device = _device()
    skipped = [0] if skipped is None else skipped

    def consume(item: tuple[torch.Tensor, object]) -> int:
        images, info = item
        skipped[0] += info.skipped
        if normalized:
            normalize(images.to(device, non_blocking=True))
        return images.shape[0]

    loader = build_train_loader(pattern, img_size=img_size, micro_batch=batch, num_workers=workers, seed=seed,
                                rank=0, world_size=1, augment=augment)
    return _timed(iter(loader), consume, warmup, steps)


def reference_transform(img_size: int, augment: Augment = Augment()) -> transforms.Compose:
    """The usual ImageNet pre-training transform (PIL jitter/crop/flip, float tensor, per-image normalisation),
    with the same settings as ours."""
    jitter = [transforms.ColorJitter(*(augment.color_jitter,) * 3)] if augment.color_jitter else []
    flip = [transforms.RandomHorizontalFlip()] if augment.hflip else []
    interpolation = transforms.InterpolationMode(augment.interpolation)
    return transforms.Compose([
        *jitter,
        transforms.RandomResizedCrop(img_size, scale=augment.crop_scale, interpolation=interpolation),
        *flip,
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _open_or_none(path: str) -> Image.Image | None:
    """ImageFolder's loader, returning None for a corrupt or truncated file instead of raising."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")          # forces the full decode: truncated data raises here
    except (OSError, ValueError, SyntaxError):  # PIL's errors for bad data
        return None


class _SkippingFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images come out as None, to be dropped (and counted) by :func:`_collate_ok`."""

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        return None if img is None else (self.transform(img), target)


def _collate_ok(items: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, targets, skipped) of the readable items of one batch."""
    ok = [x for x in items if x is not None]
    if not ok:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    images, targets = torch.utils.data.default_collate(ok)
    return images, targets, len(items) - len(ok)


def bench_baseline(root: str, *, workers: int, batch: int, img_size: int, warmup: int, steps: int,
                   seed: int = 0, augment: Augment = Augment(), skipped: list[int] | None = None) -> float:
    """img/s of torchvision ImageFolder + reference transform in a shuffling, drop_last DataLoader. Corrupt
    images are dropped from their batch and added to ``skipped[0]`` (a batch may then be short)."""
    skipped = [0] if skipped is None else skipped
    dataset = _SkippingFolder(root, transform=reference_transform(img_size, augment), loader=_open_or_none)
    if len(dataset) < batch:
        raise ValueError(f"{root} has {len(dataset)} images, fewer than one batch of {batch}")
    # shuffle=True, spelled as a sampler that draws successive permutations for exactly the batches we time:
    # one long "epoch", so runs longer than the folder do not stall at epoch boundaries (this favours the
    # baseline a little).
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=(warmup + steps) * batch,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         drop_last=True, pin_memory=torch.cuda.is_available(), collate_fn=_collate_ok)
    device = _device()

    def consume(item: tuple[torch.Tensor, torch.Tensor, int]) -> int:
        item[0].to(device, non_blocking=True)  # already normalised floats
        skipped[0] += item[2]
        return item[0].shape[0]

    return _timed(iter(loader), consume, warmup, steps)


# ------------------------------------------------------------------------------- shards -> folders

def _samples(pattern: str) -> Iterable[dict]:
    """Raw webdataset samples ({"__key__", "jpg", "cls", ...} as bytes) of every shard, in order."""
    return wds.DataPipeline(wds.SimpleShardList(expand_shards(pattern)), wds.tarfile_to_samples())


def extract_to_folders(pattern: str, root: str | Path) -> int:
    """Write the shards' images to ``root/<cls>/<key>.<ext>`` (class "0" when a sample has no ``cls``), so
    ImageFolder reads the very same bytes. Returns the number of images."""
    count = 0
    for sample in _samples(pattern):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            continue
        cls = sample["cls"].decode().strip() if "cls" in sample else "0"
        class_dir = Path(root) / cls
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{sample['__key__'].replace('/', '_')}.{key}").write_bytes(sample[key])
        count += 1
    return count


# ------------------------------------------------------------------------------------------ profile

def _ms_per(fn: Callable, items: list, repeat: int = 3) -> tuple[float, list]:
    """(ms per item, outputs) of ``fn`` over ``items``: the best of ``repeat`` passes, since the first pass
    pays for cold caches and other jobs on the machine only ever add time."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = [fn(x) for x in items]
        best = min(best, (time.perf_counter() - start) * 1e3 / max(len(items), 1))
    return best, out


def profile_stages(pattern: str, *, img_size: int, batch: int, num: int = 256) -> dict[str, float]:
    """ms per image of each stage of our worker pipeline and of the baseline's, plus faster alternatives for
    data.py, over the first ``num`` images, in this process on one thread (as a DataLoader worker runs).

    Stages mirror data.py rather than calling its private helpers, so this keeps working while it changes.
    IPC is the copy of a batch into shared memory that the worker's pickler makes (``torch.stack`` allocates
    ordinary memory); the baseline's default_collate writes its float batch straight into shared memory.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision.io's decoders are deprecated in favour of TorchCodec
            return {k: round(v, 4) for k, v in _profile(pattern, img_size, batch, num).items()}
    finally:
        torch.set_num_threads(threads)


def _profile(pattern: str, img_size: int, batch: int, num: int) -> dict[str, float]:
    start = time.perf_counter()
    raw = [s[next(k for k in IMAGE_KEYS if k in s)] for _, s in zip(range(num), _samples(pattern))]
    raw = [b for b in raw if _decodes(b)]      # corrupt images are skipped (and counted) by the timed runs
    ms = {"read_tar": (time.perf_counter() - start) * 1e3 / len(raw)}
    draft = int(img_size / (0.75 * CROP_SCALE[0]) ** 0.5) + 1  # as data.py
    ms["decode_pil"], imgs = _ms_per(lambda b: _decode_pil(b, draft), raw)
    ms["seed_rng"], _ = _ms_per(lambda i: _reseed(i, torch.manual_seed), range(len(raw)))
    augment = v2.Compose([v2.RandomResizedCrop(img_size, scale=CROP_SCALE, interpolation=v2.InterpolationMode.BICUBIC),
                          v2.RandomHorizontalFlip()])
    ms["crop_resize_flip_pil"], crops = _ms_per(augment, imgs)
    ms["to_uint8_tensor"], tensors = _ms_per(pil_to_tensor, crops)
    ms["collate_stack"], stacked = _per_batch(torch.stack, _groups(tensors, batch))
    ms["ipc_copy_to_shm"], _ = _per_batch(lambda b: torch.empty_like(b).share_memory_().copy_(b), stacked)
    ms["ours_worker_total"] = sum(ms.values())
    ms["normalize_batch_cpu"], _ = _per_batch(normalize, stacked)  # in the main process; on the GPU in training
    # The baseline worker: PIL decode (no draft) + reference transform per image, float batch into shm.
    reference = reference_transform(img_size)
    ms["baseline_decode_transform"], floats = _ms_per(lambda b: reference(Image.open(io.BytesIO(b)).convert("RGB")),
                                                      raw)
    ms["baseline_collate_float_shm"], _ = _per_batch(
        lambda xs: torch.stack(xs, out=torch.empty(len(xs), *xs[0].shape).share_memory_()), _groups(floats, batch))
    ms["baseline_worker_total"] = ms["read_tar"] + ms["baseline_decode_transform"] + ms["baseline_collate_float_shm"]
    # Faster alternatives for data.py's per-image work.
    ms["alt_seed_cpu_generator_only"], _ = _ms_per(lambda i: _reseed(i, torch.default_generator.manual_seed),
                                                   range(len(raw)))
    ms["alt_decode_torchvision_io"], decoded = _ms_per(
        lambda b: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8),
                                             mode=torchvision.io.ImageReadMode.RGB), raw)
    ms["alt_decode_pil_to_chw_view"], views = _ms_per(lambda b: _decode_pil_view(b, draft), raw)
    ms["alt_crop_resize_flip_tensor"], _ = _ms_per(augment, views)  # torch's antialiased uint8 bicubic
    ms["alt_crop_resize_pil_box_gap2"], _ = _ms_per(lambda im: _fused_crop_resize(im, img_size), imgs)
    return ms


def _decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _fused_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """RandomResizedCrop as one PIL call: resize(box=crop) skips the crop copy; reducing_gap=2 first shrinks
    by an integer factor (box filter) when the crop is >= 4x the output."""
    top, left, h, w = transforms.RandomResizedCrop.get_params(img, list(CROP_SCALE), [3 / 4, 4 / 3])
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h), reducing_gap=2.0)


def _groups(items: list, batch: int) -> list[list]:
    """``items`` in full batches (or all of them, if fewer than one batch)."""
    return [items[i:i + batch] for i in range(0, len(items) - batch + 1, batch)] or [items]


def _per_batch(fn: Callable, batches: list) -> tuple[float, list]:
    """(ms per image, outputs) of ``fn`` over ``batches`` (lists of images, or stacked tensors)."""
    ms, out = _ms_per(fn, batches)
    return ms / len(batches[0]), out


def _reseed(seed: int, manual_seed: Callable[[int], object]) -> None:
    """What data.py does around each image's augmentation: save, seed, restore the global torch RNG.
    ``torch.manual_seed`` also queues CUDA/XPU seeding, formatting a stack trace each call when CUDA is not
    initialised (as in a DataLoader worker), so it costs more the deeper the call stack."""
    outer = torch.get_rng_state()
    manual_seed(seed)
    torch.set_rng_state(outer)


def _decode_pil_view(data: bytes, draft_side: int) -> torch.Tensor:
    """PIL decode without convert()'s copy, as a CHW view of the HWC pixels (channels-last memory, which
    torch's uint8 resize kernels are fastest on)."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (draft_side, draft_side))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def _decode_pil(data: bytes, draft_side: int) -> Image.Image:
    """As data.py decodes: JPEG draft (DCT downscale only when both sides stay >= draft_side) + RGB."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (draft_side, draft_side))
    return img.convert("RGB")


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
    result["img_per_s"] = bench_ours(args.shards, **common, normalized=not args.skip_normalize, augment=augment,
                                     skipped=skipped)
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
    lines = [f"data loader benchmark: {r['workers']} workers, batch {r['batch']}, {r['img_size']} px, "
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


# ------------------------------------------------------------------------------------- class mixing

def _class_colour(c: int) -> tuple[int, int, int]:
    return (8 + 6 * c, 128, 247 - 6 * c)      # 40 colours 6 levels apart: a crop + resize keeps them apart


def write_class_sorted_shards(out: str | Path, classes: int, per_class: int) -> str:
    """`classes` shards, shard c holding `per_class` solid-colour 8 px PNGs of class c (colour = class), with a
    manifest; returns the shard pattern. Kept if already written with these sizes."""
    out = Path(out)
    pattern = f"{out}/class-{{000..{classes - 1:03d}}}.tar"
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["num_samples"] == classes * per_class:
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), _class_colour(c)).save(buf, "PNG")
        with wds.TarWriter(str(out / f"class-{c:03d}.tar")) as sink:
            for i in range(per_class):
                sink.write({"__key__": f"{c:03d}_{i:06d}", "png": buf.getvalue(), "cls": c})
    manifest.write_text(json.dumps({"num_samples": classes * per_class, "shards": [
        {"name": f"class-{c:03d}.tar", "num_samples": per_class} for c in range(classes)]}))
    return pattern


def classes_of(images: torch.Tensor, classes: int) -> torch.Tensor:
    """Class of each solid-colour image in a uint8 batch [B, 3, H, W]: the nearest class colour."""
    colours = torch.tensor([_class_colour(c) for c in range(classes)], dtype=torch.float32)
    mean = images.float().mean(dim=(2, 3))
    return torch.cdist(mean, colours).argmin(dim=1)


def mean_classes_per_batch(pattern: str, *, classes: int, batch: int, batches: int, workers: int,
                           shuffle_buffer: int, open_shards: int, resampled: bool, seed: int = 0) -> float:
    """Mean number of distinct classes in our loader's first `batches` micro-batches (one rank)."""
    loader = build_train_loader(pattern, img_size=8, micro_batch=batch, num_workers=workers, seed=seed, rank=0,
                                world_size=1, resampled=resampled, shuffle_buffer=shuffle_buffer,
                                open_shards=open_shards)
    counts = [len(classes_of(images, classes).unique()) for images, _ in itertools.islice(iter(loader), batches)]
    return sum(counts) / len(counts)


def _cmd_mix(args: argparse.Namespace) -> int:
    if not 1 <= args.classes <= 40:
        raise SystemExit("dbot-bench mix: --classes must be 1..40 (colours that stay apart)")
    pattern = write_class_sorted_shards(args.out, args.classes, args.per_class)
    result = {"classes": args.classes, "per_class": args.per_class, "batch": args.batch, "batches": args.batches,
              "workers": args.workers, "shuffle_buffer": args.shuffle_buffer, "cpu_count": os.cpu_count(),
              "mean_classes_per_batch": {}}
    print(f"class mixing: {args.classes} classes x {args.per_class} images, one class per shard; "
          f"{args.batches} micro-batches of {args.batch}, {args.workers} workers, buffer {args.shuffle_buffer}")
    for k in (int(v) for v in args.open_shards.split(",")):
        for resampled in (True, False):
            mode = "resampled" if resampled else "exact_epochs"
            mean = mean_classes_per_batch(pattern, classes=args.classes, batch=args.batch, batches=args.batches,
                                          workers=args.workers, shuffle_buffer=args.shuffle_buffer, open_shards=k,
                                          resampled=resampled)
            result["mean_classes_per_batch"][f"{mode}_open_shards_{k}"] = mean
            print(f"  open_shards {k:3d}, {mode:12s}: {mean:6.2f} distinct classes per micro-batch")
    line = json.dumps(result, sort_keys=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 0


# ------------------------------------------------------------------------------------------- CLI

def _cmd_data(args: argparse.Namespace) -> int:
    result = run_data_bench(args)
    print(_summary(result))
    line = json.dumps(result, sort_keys=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 0


def _cmd_fixture(args: argparse.Namespace) -> int:
    from dbot_ds.bench_fixtures import fixture_paths, write_photo_fixture  # needs scikit-image

    manifest = write_photo_fixture(args.out, args.num, seed=args.seed)
    pattern, folder = fixture_paths(args.out)
    print(f"wrote {manifest['num_samples']} real-photo JPEGs in {len(manifest['shards'])} shards to {args.out}")
    print(f"shard pattern: data.shards='{pattern}'")
    print(f"class folders: {folder}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbot-bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    commands = parser.add_subparsers(dest="command", required=True)

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

    p = commands.add_parser("mix", help="distinct classes per micro-batch from class-sorted shards")
    p.add_argument("--out", required=True, help="folder for the shards (reused if it already holds them)")
    p.add_argument("--classes", type=int, default=20, help="classes, one shard each (default 20, at most 40)")
    p.add_argument("--per-class", type=int, default=1000, help="images per class/shard (default 1000)")
    p.add_argument("--batch", type=int, default=128, help="micro-batch (default 128)")
    p.add_argument("--batches", type=int, default=40, help="micro-batches measured per setting (default 40)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="as data.shuffle_buffer (default 1000)")
    p.add_argument("--open-shards", default=f"1,{DEFAULT_OPEN_SHARDS}",
                   help=f"comma-separated data.open_shards values to compare (default 1,{DEFAULT_OPEN_SHARDS}; "
                        "1 = the reading order before open_shards existed)")
    p.add_argument("--json", help="also write the JSON result to this file")
    p.set_defaults(func=_cmd_mix)

    p = commands.add_parser("fixture", help="ImageNet-like JPEGs from real photos, as shards and class folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_fixture)

    p = commands.add_parser("step", help="training-step throughput, TFLOP/s, MFU and memory (see bench_step.py)")
    from . import bench_step
    bench_step.add_arguments(p)
    p.set_defaults(func=bench_step.main)

    from . import bench_fp8, bench_memcheck, bench_monitor, bench_repro, bench_run, bench_sweep
    bench_fp8.add_command(commands)
    bench_memcheck.add_command(commands)
    bench_monitor.add_command(commands)
    bench_run.add_command(commands)
    bench_repro.add_command(commands)
    bench_sweep.add_command(commands)

    args = parser.parse_args(argv)
    if args.command == "data" and (args.steps < 1 or args.batch < 1 or args.warmup < 0 or args.workers < 0):
        parser.error("need --steps >= 1, --batch >= 1, --warmup >= 0, --workers >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(cli())
