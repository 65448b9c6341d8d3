"""`dbot-bench mix`: how many distinct classes our loader mixes into a micro-batch from class-sorted shards
(one class per shard), for each `--open-shards` value; the shards, the class read-back, the subcommand."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from dbot_ds.data.epochs import DEFAULT_OPEN_SHARDS
from dbot_ds.data.stream import build_train_loader

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


def add_command(commands) -> None:
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
