"""An ImageNet-like benchmark set made from real photographs, for `dbot-bench fixture`.

Synthetic shapes compress far better than photos and decode faster, so loader timings on them flatter
every loader. Here each image is a random crop / small rotation / flip / colour jitter of one of the photos
bundled with scikit-image (offline, in the wheel), resized so its short side is 375-500 px at a ~4:3 aspect
(ImageNet's typical size) and saved as JPEG quality 90. The label is the source photo.

The same bytes are written twice: as webdataset shards (+ manifest.json, the format of
:mod:`dbot_ds.data.shards`) and as a class-folder tree ``files/<class>/<i>.jpg`` for torchvision's ImageFolder.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from dbot_ds.data.manifest import shard_pattern
from dbot_ds.data.synthetic import write_generated_shards

# Real photographs in the scikit-image wheel (no pooch download needed), sorted so the class index equals
# ImageFolder's (alphabetical) index. Grey ones are stored as 3-channel JPEGs, as ImageNet's grey images are
# read. Skipped: drawings/synthetic images (logo, colorwheel, text, page, phantom, checkerboard) and the ones
# that need a download (e.g. eagle, lily, skin).
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket")
SHORT_SIDE = (375, 500)  # px, inclusive
MAX_ROTATION = 12.0      # degrees
JPEG_QUALITY = 90


def load_photos() -> dict[str, Image.Image]:
    """{name: RGB PIL image} of the :data:`PHOTOS` that load offline (missing ones are skipped)."""
    import skimage.data

    photos = {}
    for name in PHOTOS:
        try:
            arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        except Exception:  # e.g. a future scikit-image moved it to the download-only set
            continue
        photos[name] = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
    if not photos:
        raise RuntimeError("none of the scikit-image sample photos could be loaded")
    return photos


def _safe_scale(w: int, h: int, angle: float) -> float:
    """Largest s such that a centred (s*w) x (s*h) box has no blank corners after rotating by ``angle`` deg:
    the box, rotated back, must fit in w x h."""
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    return min(w / (w * c + h * s), h / (w * s + h * c))


def _random_view(rng: np.random.Generator, photo: Image.Image) -> Image.Image:
    """One augmented view of ``photo``: flip, small rotation, ~4:3 crop, short side 375-500 px, colour jitter,
    a little sensor-like noise (upscaled crops would otherwise be unrealistically smooth, i.e. easy JPEGs)."""
    img = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else photo
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC)
    w, h = img.size
    inner_w, inner_h = w * _safe_scale(w, h, angle), h * _safe_scale(w, h, angle)
    # Crop: 40-100 % of the usable area, aspect 4:3 or 3:4 (+-10 %).
    aspect = (4 / 3 if rng.random() < 0.7 else 3 / 4) * rng.uniform(0.9, 1.1)
    area = rng.uniform(0.4, 1.0) * inner_w * inner_h
    cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
    fit = min(1.0, inner_w / cw, inner_h / ch)  # shrink (keeping the aspect) to fit the usable rectangle
    cw, ch = cw * fit, ch * fit
    x0 = (w - inner_w) / 2 + rng.random() * (inner_w - cw)
    y0 = (h - inner_h) / 2 + rng.random() * (inner_h - ch)
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    size = (short, round(short * ch / cw)) if cw <= ch else (round(short * cw / ch), short)
    img = img.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(0.75, 1.25)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(1.0, 3.0), (size[1], size[0], 1))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_photo_fixture(out_dir: str | Path, num: int, *, seed: int = 0, per_shard: int = 256) -> dict:
    """Write ``num`` JPEGs to ``out_dir/shard-NNNNNN.tar`` (+ manifest.json) and ``out_dir/files/<class>/``.

    Image i shows photo ``i % len(photos)`` (balanced classes; ``cls`` in the shards = ImageFolder's index when
    num >= number of photos) and draws its augmentation from an RNG seeded by (seed, i). Returns the manifest.
    """
    out_dir = Path(out_dir)
    photos = load_photos()
    names = sorted(photos)

    def make(i: int) -> tuple[bytes, int]:
        rng = np.random.default_rng([seed, i])
        cls = i % len(names)  # balanced classes
        buf = io.BytesIO()
        _random_view(rng, photos[names[cls]]).save(buf, format="JPEG", quality=JPEG_QUALITY)
        class_dir = out_dir / "files" / names[cls]       # the same bytes as files, for the ImageFolder baseline
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{i:08d}.jpg").write_bytes(buf.getvalue())
        return buf.getvalue(), cls

    return write_generated_shards(out_dir, num, per_shard, make)


def fixture_paths(out_dir: str | Path) -> tuple[str, str]:
    """(shard brace pattern, class-folder root) of a fixture written by :func:`write_photo_fixture`."""
    return shard_pattern(out_dir), str(Path(out_dir) / "files")
