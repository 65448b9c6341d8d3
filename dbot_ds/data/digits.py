"""Real labelled images that install with the test dependencies: scikit-learn's bundled handwritten digits as shards.

    dbot-shards digits --out data/digits_train --split train      # 1437 images, class-mixed shards
    dbot-shards digits --out data/digits_val --split val          # 360 images (every 5th), in dataset order

`sklearn.datasets.load_digits()` ships 1797 real 8x8 grayscale digits (10 classes) inside the package, so kNN /
linear-probe tests and the miniature benchmark need no download. Each 8x8 value (0..16) is the count of inked
pixels in a 4x4 block of the original 32x32 NIST bitmap, so bicubic upsampling to 32 px approximately undoes that
block averaging and gives smooth, recognisable strokes (nearest + blur gives blocky ones). Ink is drawn dark on
white, as on the scanned forms, and the grey is replicated to RGB because the encoder reads 3 channels.

Split rule (fixed, so train and val never overlap): dataset index i is val when ``i % val_every == 0``. The train
split (and ``all``) is shuffled with ``seed`` so every shard holds all classes; val keeps dataset order. Keys are
positions 0..n-1 in the written order; :func:`split_indices` maps them back to dataset indices, and the manifest
records the arguments that reproduce that order.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import write_manifest
from .synthetic import write_generated_shards

SPLITS = ("train", "val", "all")
NUM_DIGITS = 1797                  # images in sklearn's bundled copy of the UCI optdigits test set
JPEG_QUALITY = 95


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float in 0..16, targets [1797] int) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the digits shards need scikit-learn, which ships the 1797 digit images: run `pip install "
            "scikit-learn` (or install dbot-ds with the test extra: `pip install -e '.[test]'`)") from e
    data = sk_load_digits()
    return data.images, data.target


def split_indices(num: int, split: str, val_every: int = 5, seed: int = 0) -> np.ndarray:
    """Dataset indices of ``split`` in written order: val = i % val_every == 0 in dataset order; train = the rest,
    shuffled with ``seed``; all = every index, shuffled with ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (every val_every-th image is val), got {val_every}")
    index = np.arange(num)
    if split == "val":
        return index[index % val_every == 0]
    chosen = index if split == "all" else index[index % val_every != 0]
    # Dataset order runs through the classes in long stretches; a shuffle makes each shard class-mixed.
    return np.random.default_rng(seed).permutation(chosen)


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One digit [8, 8] (0..16, ink = high) -> RGB ``size`` x ``size`` image, dark ink on white, bicubic."""
    grey = (255.0 - pixels * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def write_digits_shards(out_dir: str | Path, *, size: int = 32, split: str = "train", val_every: int = 5,
                        per_shard: int = 256, seed: int = 0) -> dict:
    """Write ``split`` of the digits as JPEG (quality 95) webdataset shards ``out_dir/shard-NNNNNN.tar``
    (keys ``__key__``, ``jpg``, ``cls``) plus manifest.json; returns the manifest. Byte-identical on reruns."""
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    images, targets = load_digits()
    order = split_indices(len(images), split, val_every, seed)

    def make(position: int) -> tuple[bytes, int]:
        i = int(order[position])
        buf = io.BytesIO()
        digit_image(images[i], size).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), int(targets[i])

    manifest = write_generated_shards(out_dir, len(order), per_shard, make)
    # Rewrite the manifest with the provenance that reproduces the key -> dataset index mapping.
    import sklearn
    counts = [s["num_samples"] for s in manifest["shards"]]
    return write_manifest(Path(out_dir), counts, {
        "source": "sklearn.datasets.load_digits", "sklearn_version": sklearn.__version__, "split": split,
        "val_every": val_every, "seed": seed, "size": size, "num_classes": 10,
        "order": f"dbot_ds.data.digits.split_indices({len(images)}, {split!r}, {val_every}, {seed})[key]"})

