"""Generated images as shards: :func:`write_generated_shards` (samples from any ``make(i) -> (JPEG bytes, class)``,
with fixed tar mtimes and a manifest; digits.py and the bench fixtures write through it too) and the procedural
shapes-on-gradients images of `dbot-shards synthetic` (:func:`write_synthetic_shards`).

Separate from shards.py, the `dbot-shards` CLI that imports every writer, so that digits.py and dataset.py can
write shards without importing the CLI.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from .manifest import SHARD_NAME, write_manifest

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
    return write_manifest(out_dir, counts)


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
