"""`dbot-shards`: write WebDataset shards (+ manifest.json) for dbot-ds.

    dbot-shards synthetic --out data/synth --num 2000
    dbot-shards imagenet --src ILSVRC2012_img_train.tar --out data/in1k   # see dbot_ds.shard_writer
    dbot-shards folder --src photos/ --out data/photos
    dbot-shards digits --out data/digits --split train   # real labelled 8x8 digits (scikit-learn), see dbot_ds.digits
    dbot-shards manifest data/my_shards          # manifest.json for shards written by other tools

Each shard is ``shard-NNNNNN.tar`` holding samples ``{"__key__": "%08d", "jpg": JPEG bytes, "cls": int}``;
``manifest.json`` next to them records the sample counts that :func:`dbot_ds.data.dataset_size` reads:
``{"num_samples": N, "shards": [{"name": "shard-000000.tar", "num_samples": n}, ...]}``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

SHARD_NAME = "shard-{:06d}.tar"
MANIFEST = "manifest.json"
# Main shape per class (class % len); class // len picks filled vs outlined, so 10 classes are distinct.
SHAPES = ("ellipse", "rectangle", "triangle", "pentagon", "star")


# ------------------------------------------------------------------------------------- synthetic

def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, colour: tuple,
           filled: bool) -> None:
    """Draw one shape of radius ``r`` px centred at (cx, cy), rotated by ``angle`` degrees."""
    fill, outline, width = (colour, None, 1) if filled else (None, colour, max(1, int(r / 5)))
    if kind == "ellipse":
        ry = r * 0.6
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=fill, outline=outline, width=width)
    elif kind == "rectangle":
        draw.rectangle((cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r), fill=fill, outline=outline, width=width)
    elif kind in ("triangle", "pentagon"):
        sides = 3 if kind == "triangle" else 5
        draw.regular_polygon((cx, cy, r), sides, rotation=angle, fill=fill, outline=outline, width=width)
    else:  # 5-pointed star: alternate outer/inner radius
        t = np.deg2rad(angle) + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = list(zip((cx + rad * np.cos(t)).tolist(), (cy + rad * np.sin(t)).tolist()))
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def synthetic_image(rng: np.random.Generator, size: int, cls: int) -> Image.Image:
    """A procedural RGB image (size x size): gradient background, a few small distractor shapes, one big
    shape whose type/fill is set by ``cls``, plus Gaussian pixel noise."""
    # Background: linear gradient between two random colours along a random direction.
    c0, c1 = rng.integers(0, 256, (2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.cos(theta) * xx + np.sin(theta) * yy
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        _shape(draw, SHAPES[rng.integers(len(SHAPES))], *rng.uniform(0, size, 2), rng.uniform(0.05, 0.15) * size,
               rng.uniform(0, 360), tuple(rng.integers(0, 256, 3).tolist()), bool(rng.integers(2)))
    _shape(draw, SHAPES[cls % len(SHAPES)], *rng.uniform(0.35, 0.65, 2) * size, rng.uniform(0.2, 0.35) * size,
           rng.uniform(0, 360), tuple(rng.integers(0, 256, 3).tolist()), (cls // len(SHAPES)) % 2 == 0)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 12), (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write_manifest(out_dir: Path, counts: list[int], extra: dict | None = None) -> dict:
    """Write ``manifest.json`` for shards 0..len(counts)-1 holding ``counts`` samples; ``extra`` keys
    (provenance such as seed or source) are appended after the ones the loader reads."""
    manifest = {"num_samples": sum(counts),
                "shards": [{"name": SHARD_NAME.format(i), "num_samples": n} for i, n in enumerate(counts)],
                **(extra or {})}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_generated_shards(out_dir: str | Path, num: int, per_shard: int,
                           make: Callable[[int], tuple[bytes, int]]) -> dict:
    """Write samples 0..num-1, each ``make(i) -> (JPEG bytes, class)``, to ``out_dir/shard-NNNNNN.tar`` with fixed
    tar mtimes (byte-identical re-runs), plus manifest.json; returns the manifest."""
    if num < 1 or per_shard < 1:
        raise ValueError(f"need num >= 1 and per_shard >= 1, got num={num}, per_shard={per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = []
    for shard in range(math.ceil(num / per_shard)):
        indices = range(shard * per_shard, min(num, (shard + 1) * per_shard))
        with wds.TarWriter(str(out_dir / SHARD_NAME.format(shard)), mtime=0) as sink:
            for i in indices:
                jpeg, cls = make(i)
                sink.write({"__key__": f"{i:08d}", "jpg": jpeg, "cls": str(cls).encode()})
        counts.append(len(indices))
    return _write_manifest(out_dir, counts)


def write_synthetic_shards(out_dir: str | Path, num: int, *, img_size: int = 64, per_shard: int = 256,
                           seed: int = 0, num_classes: int = 10) -> dict:
    """Write ``num`` synthetic JPEG samples to ``out_dir/shard-NNNNNN.tar`` and return the manifest.

    Deterministic given ``seed``: sample i uses its own RNG seeded by (seed, i), and tar mtimes are fixed,
    so the same arguments give byte-identical shards.
    """
    def make(i: int) -> tuple[bytes, int]:
        rng = np.random.default_rng([seed, i])
        cls = int(rng.integers(num_classes))
        buf = io.BytesIO()
        synthetic_image(rng, img_size, cls).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), cls

    return write_generated_shards(out_dir, num, per_shard, make)


def shard_pattern(out_dir: str | Path) -> str:
    """Shard pattern for a directory written by this module (from its manifest), e.g.
    ``DIR/shard-{000000..000007}.tar``; falls back to '::'-joined paths for non-consecutive names."""
    out_dir = Path(out_dir)
    names = [e["name"] for e in json.loads((out_dir / MANIFEST).read_text())["shards"]]
    if names == [SHARD_NAME.format(i) for i in range(len(names))]:
        if len(names) == 1:
            return str(out_dir / names[0])
        return str(out_dir / f"shard-{{000000..{len(names) - 1:06d}}}.tar")
    return "::".join(str(out_dir / n) for n in names)


def count_tar_samples(path: str | Path) -> int:
    """Samples in one webdataset tar, as the loader groups them: consecutive members sharing a key (the name up to
    the first dot of the file name). Reads only the 512-byte headers and seeks over the data, so counting
    ImageNet's 1.28 M images takes seconds to minutes, not a full read."""
    samples, key = 0, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            head, name = os.path.split(member.name)
            if "." not in name or name.startswith("."):
                continue                         # webdataset skips names without an extension
            k = os.path.join(head, name.split(".", 1)[0])
            if k != key:
                samples, key = samples + 1, k
    return samples


def write_manifest_for(folder: str | Path) -> dict:
    """manifest.json for the existing ``*.tar`` shards of ``folder`` (any names), counted from tar headers."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise SystemExit(f"dbot-shards manifest: no .tar files in {folder}")
    manifest = {"num_samples": 0, "shards": [{"name": t.name, "num_samples": count_tar_samples(t)} for t in tars]}
    manifest["num_samples"] = sum(e["num_samples"] for e in manifest["shards"])
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------- CLI

def _cmd_synthetic(args: argparse.Namespace) -> int:
    manifest = write_synthetic_shards(args.out, args.num, img_size=args.img_size, per_shard=args.per_shard,
                                      seed=args.seed)
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.out}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    print(f"shard pattern: data.shards='{shard_pattern(args.out)}'")
    return 0


def _cmd_digits(args: argparse.Namespace) -> int:
    from dbot_ds.digits import write_digits_shards  # imported here because digits imports this module
    try:
        manifest = write_digits_shards(args.out, size=args.size, split=args.split)
    except ModuleNotFoundError as e:  # scikit-learn missing: the message names the install command
        raise SystemExit(f"dbot-shards digits: {e}") from None
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.out}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    print(f"shard pattern: data.shards='{shard_pattern(args.out)}'")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    manifest = write_manifest_for(args.dir)
    print(f"counted {manifest['num_samples']} samples in {len(manifest['shards'])} shards; wrote "
          f"{Path(args.dir) / MANIFEST}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbot-shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synthetic", help="procedural shapes-on-gradients JPEGs, for smoke tests")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--img-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synthetic)

    p = commands.add_parser("digits", help="scikit-learn's 1797 real 8x8 handwritten digits, upsampled (needs "
                            "scikit-learn)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--split", choices=["train", "val", "all"], default="train",
                   help="val: every 5th image; train: the rest, shuffled; all: both, shuffled (default train)")
    p.set_defaults(func=_cmd_digits)

    p = commands.add_parser("manifest", help="write manifest.json (sample counts) for existing .tar shards")
    p.add_argument("dir", help="folder holding the shards; manifest.json is written there")
    p.set_defaults(func=_cmd_manifest)
    # Imported here because shard_writer imports this module.
    from dbot_ds.shard_writer import add_commands
    add_commands(commands)  # `imagenet` and `folder`

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(cli())
