"""`dbot-bench data --profile`: ms per image of each stage of our loader's worker pipeline and of the
ImageFolder reference's, plus faster alternatives, measured in-process on one thread."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from dbot_ds.data.augment import IMAGE_KEYS, Augment, normalize

from .loaders import _samples, reference_transform

CROP_SCALE = Augment().crop_scale      # the profile's fixed setting (the bootstrapped recipe's)


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
    dbot_ds/data/, over the first ``num`` images, in this process on one thread (as a DataLoader worker runs).

    Stages mirror dbot_ds/data/ (augment.py, stream.py) rather than calling its private helpers, so this keeps working while it changes.
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
    draft = int(img_size / (0.75 * CROP_SCALE[0]) ** 0.5) + 1  # as data/augment.py
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
    # Faster alternatives for the loader's per-image work.
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
    """What the loader does around each image's augmentation: save, seed, restore the global torch RNG.
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
    """As data/augment.py decodes: JPEG draft (DCT downscale only when both sides stay >= draft_side) + RGB."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (draft_side, draft_side))
    return img.convert("RGB")
