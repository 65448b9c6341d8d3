"""Samples to training images: decoding (:func:`_load_rgb`), the training augmentation (:class:`Augment`, applied
per image by :class:`_Decoder` with its own seed), and the ImageNet normalisation (:func:`normalize`,
`IMAGENET_MEAN`/`IMAGENET_STD`) that turns the uint8 batches into floats on the GPU.

Separate from stream.py because it is per-image pixel work with no notion of shards, readers or batches; the
kNN monitor, the teachers and the benchmarks use the decoder and the normalisation without the stream.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .shard_reader import _read_ok, _skip

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call; they are still
# the fastest CPU JPEG path, so that one warning is silenced; PIL serves where they are missing.
warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg
    _RGB = ImageReadMode.RGB
except ImportError:  # pragma: no cover
    _decode_jpeg = None

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_rgb(data: bytes, min_side: int) -> torch.Tensor:
    """Decoded RGB image as a uint8 tensor [3, H, W]. Corrupt or truncated data raises."""
    img = Image.open(io.BytesIO(data))                     # reads the header only
    if _decode_jpeg is not None and img.format == "JPEG" and min(img.size) < 2 * min_side:
        try:   # libjpeg-turbo straight into a tensor: ~25% faster than PIL plus the array copy, same pixels
            return _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_RGB)
        except RuntimeError:
            pass                                           # e.g. CMYK: PIL below converts it, or raises
    # JPEG only: decode at 1/2, 1/4 or 1/8 resolution when the result still has >= min_side pixels per side.
    # Big speed-up for large photos; a no-op for other formats.
    img.draft("RGB", (min_side, min_side))
    img = img.convert("RGB") if img.mode != "RGB" else img
    # np.asarray forces the full decode, so corrupt/truncated data raises here. The array is read-only; the
    # tensor is only read (the crop/resize makes a new one), so no copy is made.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


class Augment(NamedTuple):
    """The training augmentation (config keys data.crop_scale, data.hflip, data.interpolation, data.color_jitter).
    Defaults: the bootstrapped recipe. The CLIP recipe (reference `beit` branch) uses crop_scale (0.4, 1.0) and
    color_jitter 0.4."""
    crop_scale: tuple[float, float] = (0.2, 1.0)   # RandomResizedCrop area range, fractions of the image
    hflip: bool = True                             # random horizontal flip, p = 0.5
    interpolation: str = "bicubic"                 # of the crop's resize: bicubic or bilinear
    color_jitter: float = 0.0                      # ColorJitter(b, c, s = this, hue 0) before the crop; 0 = off

    def check(self) -> Augment:
        lo, hi = (float(x) for x in self.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError(f"color_jitter must be in [0, 1] (0 = off), got {self.color_jitter}")
        return self._replace(crop_scale=(lo, hi))


class Views(NamedTuple):
    """A sample's two views when the teacher reads another size than the student (teacher.input_size): both cut
    from the same random crop and flipped together, as the reference's second_input_size. uint8 [3, S, S] and
    [3, T, T] per image, or [B, 3, S, S] and [B, 3, T, T] per batch."""
    student: torch.Tensor
    teacher: torch.Tensor


class _Decoder:
    """Raw sample -> augmented uint8 [3, S, S] (or `Views` with `teacher_size`), or None if unreadable: ColorJitter
    (if on) on the whole image as the reference applies it, then RandomResizedCrop, then the flip (crop and flip
    commute in distribution).

    With `teacher_size` (T px) the same crop box is also resized to T x T with bicubic, the reference's second
    view for a teacher of another patch size: one decode, one crop, two resizes from the crop's own pixels (not a
    resize of the S px view). The RNG draws are those of torchvision's v2 pipeline (ColorJitter,
    RandomResizedCrop, RandomHorizontalFlip), so the student's view is the same with or without the teacher's.

    Each image's augmentation is seeded by its own integer, so a stream can skip ahead (resume) without
    replaying the RNG, and the caller's global torch RNG is left as it was."""

    def __init__(self, img_size: int, augment: Augment = Augment(), teacher_size: int = 0):
        augment = augment.check()
        self.jitter = v2.ColorJitter(*(augment.color_jitter,) * 3) if augment.color_jitter else None
        self.crop = v2.RandomResizedCrop(img_size, scale=augment.crop_scale)   # only its parameters are drawn
        self.resizes = [(img_size, INTERPOLATIONS[augment.interpolation])]
        if teacher_size and teacher_size != img_size:
            self.resizes.append((teacher_size, v2.InterpolationMode.BICUBIC))
        self.hflip = augment.hflip
        # The smallest crop (min scale, aspect 3/4) spans sqrt(0.75 * scale) of the short side; decoding the
        # JPEG at no less than the larger output / that keeps every crop (and view) at full output resolution.
        out = max(size for size, _ in self.resizes)
        self.draft_side = int(out / (0.75 * augment.crop_scale[0]) ** 0.5) + 1

    def _augment(self, img: torch.Tensor) -> torch.Tensor | Views:
        """One image's views; draws from torch's default generator (seeded by the caller)."""
        if self.jitter is not None:
            img = self.jitter(img)
        box = self.crop.make_params([img])                      # top, left, height, width
        views = [v2.functional.resized_crop(img, **box, size=[size, size], interpolation=mode, antialias=True)
                 for size, mode in self.resizes]
        if self.hflip and torch.rand(1) < 0.5:                  # v2.RandomHorizontalFlip's own draw
            views = [v2.functional.horizontal_flip(v) for v in views]
        views = [v.contiguous() for v in views]
        return views[0] if len(views) == 1 else Views(*views)

    def image_bytes(self, sample: dict, count: bool) -> bytes | None:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None and count:
            _skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has none of {IMAGE_KEYS}")
        return None if key is None else sample[key]

    def __call__(self, sample: dict, seed: int, count: bool = True, validate_only: bool = False):
        data = self.image_bytes(sample, count)
        if data is None:
            return None
        try:
            img = _load_rgb(data, 1 if validate_only else self.draft_side)   # 1: smallest DCT scale, cheap
        except Exception as exn:  # PIL raises a zoo of types for bad data
            if count:
                _skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: {exn!r}"[:300])
            return None
        _read_ok()
        if validate_only:
            return True
        # Crop and resize run on the uint8 tensor (torch's antialiased bicubic kernel: ~4x faster than PIL's
        # here). Only the CPU generator is seeded: torch.manual_seed would also touch every accelerator.
        rng = torch.default_generator
        outer = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self._augment(img)
        finally:
            rng.set_state(outer)


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them from Python lists every step would be a blocking host->device copy.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1) * 255
    return mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (0..255, any device) -> ``dtype`` ``(x / 255 - mean) / std`` per channel.

    Computed in float32 and cast at the end, so bf16/fp16 outputs only round once.
    """
    mean, std = _mean_std(images.device)
    return images.float().sub_(mean).div_(std).to(dtype)     # in place on the fresh float copy
