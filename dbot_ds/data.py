"""WebDataset training stream for dBOT pre-training.

The stream is infinite and fully determined by ``seed``: shard sampling, the sample shuffle buffer and the
augmentations each draw from their own RNG seeded from (seed, rank, dataloader worker). The trainer counts
steps itself, so every rank runs the same number of steps regardless of shard sizes.

Batches leave the workers as uint8 ``[B, 3, H, W]`` (4x less host->device traffic than float32);
:func:`normalize` turns them into normalised floats on the GPU.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Independent RNG streams per worker, so e.g. changing the shuffle buffer does not change shard order.
_SHARD_STREAM, _SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1, 2
_WARN_EVERY_S = 10.0
# If this many samples/shards in a row fail, the data is broken rather than noisy: fail loudly instead of
# spinning forever on an endless stream that never yields a batch.
_MAX_CONSECUTIVE_SKIPS = 1000


# ----------------------------------------------------------------------------------------------- shards

def _local_path(url: str) -> str | None:
    """Filesystem path of a local shard ('path' or 'file:path'), None for remote/pipe urls."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return None


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; several patterns may be joined with '::'.

    Local paths must exist. 'pipe:' commands and remote urls (http(s)://, s3://, ...) are passed through
    unchecked, because only the reader can tell whether they work.
    """
    shards = [s for part in pattern.split("::") if part for s in braceexpand.braceexpand(part)]
    if not shards:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    missing = [s for s in shards if (p := _local_path(s)) is not None and not os.path.exists(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards from pattern {pattern!r} do not exist: {shown}. "
            "Check the path and brace range, or generate test shards with "
            "`dbot-shards synthetic --out DIR --num N` and use the pattern it prints."
        )
    return shards


def dataset_size(pattern: str) -> int:
    """Number of samples in the shards of ``pattern``, from the ``manifest.json`` next to them.

    Format: ``{"num_samples": N, "shards": [{"name": "shard-000000.tar", "num_samples": n}, ...]}``.
    Counts are summed per shard, so a pattern covering a subset of a directory gets the subset's size.
    """
    by_dir: dict[str, list[str]] = {}
    for s in expand_shards(pattern):
        if (path := _local_path(s)) is not None:
            directory, name = os.path.split(os.path.abspath(path))
            by_dir.setdefault(directory, []).append(name)
    if not by_dir:
        raise ValueError(f"cannot count the samples of {pattern!r}: it has no local shards to find a "
                         "manifest.json next to; set `data.num_samples` in the config.")
    total = 0
    for directory, names in by_dir.items():
        manifest_path = os.path.join(directory, "manifest.json")
        if not os.path.exists(manifest_path):
            raise ValueError(f"no manifest.json in {directory} (written by `dbot-shards`), so the dataset size "
                             "is unknown; set `data.num_samples` in the config.")
        with open(manifest_path) as f:
            counts = {e["name"]: int(e["num_samples"]) for e in json.load(f)["shards"]}
        unknown = [n for n in names if n not in counts]
        if unknown:
            raise ValueError(f"{unknown[:3]} not listed in {manifest_path}; regenerate the shards or set "
                             "`data.num_samples` in the config.")
        total += sum(counts[n] for n in names)
    return total


# ----------------------------------------------------------------------------------- seeds and workers

def _mix_seed(*ints: int) -> int:
    """A well-mixed 63-bit seed from a few ints. Unlike hash() of strings this is stable across processes."""
    state = np.random.SeedSequence([int(i) % 2**63 for i in ints]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _worker_seed(seed: int, rank: int, stream: int) -> int:
    return _mix_seed(seed, rank, _worker()[0], stream)


def _node_worker_split(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This (rank, worker)'s disjoint share of ``shards``: first by rank, then by worker."""
    return shards[rank::world_size][worker::num_workers]


def _epoch_shards(shards: list[str], *, seed: int, rank: int, world_size: int) -> Iterator[dict]:
    """Non-resampled shard source: each epoch every shard once, forever (epoch 0, 1, ...).

    The order is shuffled with an RNG seeded by (seed, epoch) only, so all ranks agree on it and the
    rank/worker split is a partition. rank/world_size are explicit: torch.distributed may not be up yet.
    """
    worker, num_workers = _worker()
    for epoch in itertools.count():
        order = list(shards)
        random.Random(_mix_seed(seed, epoch)).shuffle(order)
        for url in _node_worker_split(order, rank, world_size, worker, num_workers):
            yield {"url": url}


# ------------------------------------------------------------------------------------ error handling

_skipped = 0
_consecutive_skips = 0
_last_warning = 0.0


def skipped_samples() -> int:
    """Samples (and unreadable shards/tar members) skipped so far in this process (per DataLoader worker)."""
    return _skipped


def _skip(reason: str) -> None:
    """Count a skipped sample and warn at most once every ``_WARN_EVERY_S`` seconds per process."""
    global _skipped, _consecutive_skips, _last_warning
    _skipped += 1
    _consecutive_skips += 1
    if _consecutive_skips > _MAX_CONSECUTIVE_SKIPS:
        raise RuntimeError(f"{_consecutive_skips} samples in a row could not be read (last: {reason}); "
                           "the shards look broken.")
    now = time.monotonic()
    if now - _last_warning >= _WARN_EVERY_S:
        _last_warning = now
        log.warning("skipping unreadable sample (%d skipped so far in pid %d): %s", _skipped, os.getpid(), reason)


def _skip_handler(exn: Exception) -> bool:
    """webdataset handler: count and continue (wds.warn_and_continue sleeps 0.5 s per error)."""
    _skip(repr(exn)[:300])
    return True


# -------------------------------------------------------------------------------- decode and augment

def _seeded_shuffle(samples: Iterator[dict], *, bufsize: int, seed: int, rank: int) -> Iterator[dict]:
    """wds.shuffle with an explicit per-worker RNG, created here (in the worker) so workers differ."""
    rng = random.Random(_worker_seed(seed, rank, _SHUFFLE_STREAM))
    return wds.shuffle(bufsize, initial=bufsize, rng=rng)(samples)


def _load_rgb(data: bytes, min_side: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    # JPEG only: decode at 1/2, 1/4 or 1/8 resolution when the result still has >= min_side pixels per side.
    # Big speed-up for large photos; a no-op for other formats.
    img.draft("RGB", (min_side, min_side))
    return img.convert("RGB")  # forces the full decode, so corrupt/truncated data raises here


def _decode_augment(samples: Iterator[dict], *, img_size: int, crop_scale: tuple[float, float], seed: int,
                    rank: int) -> Iterator[torch.Tensor]:
    """Raw samples -> augmented uint8 tensors [3, img_size, img_size]. Unreadable samples are skipped."""
    global _consecutive_skips
    augment = v2.Compose([
        v2.RandomResizedCrop(img_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
    ])
    # The smallest crop (min scale, aspect 3/4) spans sqrt(0.75 * scale) of the short side; decoding the JPEG
    # at no less than img_size / that keeps the crop at full output resolution.
    draft_side = int(img_size / (0.75 * crop_scale[0]) ** 0.5) + 1
    # torchvision transforms draw from torch's global RNG. We swap in our own RNG state around each call, so
    # the augmentations are reproducible and the caller's (e.g. the trainer's, with num_workers=0) RNG is
    # left untouched.
    rng_state = torch.Generator().manual_seed(_worker_seed(seed, rank, _AUGMENT_STREAM)).get_state()
    for sample in samples:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            _skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has none of {IMAGE_KEYS}")
            continue
        try:
            img = _load_rgb(sample[key], draft_side)
        except Exception as exn:  # PIL raises a zoo of types for bad data
            _skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: {exn!r}"[:300])
            continue
        outer_state = torch.get_rng_state()
        torch.set_rng_state(rng_state)
        try:
            img = augment(img)
            rng_state = torch.get_rng_state()
        finally:
            torch.set_rng_state(outer_state)
        _consecutive_skips = 0
        yield pil_to_tensor(img)  # uint8 [3, H, W]


def _with_skip_counts(batches: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, int]]:
    """Attach to each batch the samples this worker skipped since its previous batch: the counter lives in the
    worker process, and this is how the count reaches the trainer."""
    seen = _skipped
    for images in batches:
        yield images, _skipped - seen
        seen = _skipped


# ------------------------------------------------------------------------------------------- loader

def build_train_loader(pattern: str, *, img_size: int, micro_batch: int, num_workers: int, seed: int,
                       rank: int, world_size: int, resampled: bool = True, shuffle_buffer: int = 1000,
                       crop_scale: tuple[float, float] = (0.2, 1.0)) -> Iterable[tuple[torch.Tensor, int]]:
    """INFINITE iterable of (uint8 image batch ``[micro_batch, 3, img_size, img_size]`` (CPU, pinned if CUDA),
    number of samples skipped as unreadable since the producing worker's previous batch).

    resampled=True draws shards with replacement (per-worker RNG from seed/rank/worker); resampled=False
    walks epochs of a (seed, epoch)-shuffled shard list split across ranks and workers. Either way the stream
    never ends and is reproducible for a fixed (seed, rank, num_workers).
    """
    shards = expand_shards(pattern)
    if resampled:
        source = wds.ResampledShards(
            shards, seed=seed, deterministic=True,
            worker_seed=functools.partial(_worker_seed, seed, rank, _SHARD_STREAM),
        )
    else:
        readers = world_size * max(num_workers, 1)
        if len(shards) < readers:
            # A reader without shards would loop over empty epochs forever and hang its rank.
            raise ValueError(
                f"resampled=False needs at least one shard per reader, but {len(shards)} shards < "
                f"{world_size} ranks x {max(num_workers, 1)} workers = {readers}. Write more (smaller) shards, "
                "use fewer data workers, or set resampled=True."
            )
        source = functools.partial(_epoch_shards, shards, seed=seed, rank=rank, world_size=world_size)

    pipeline = wds.DataPipeline(
        source,                                          # {"url": ...}, forever
        wds.tarfile_to_samples(handler=_skip_handler),   # {"__key__", "jpg", ...} raw bytes
        functools.partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed, rank=rank)
        if shuffle_buffer > 1 else None,                 # None stages are dropped by DataPipeline
        functools.partial(_decode_augment, img_size=img_size, crop_scale=tuple(crop_scale), seed=seed,
                          rank=rank),                    # uint8 [3, H, W]
        wds.batched(micro_batch, collation_fn=torch.stack, partial=False),  # uint8 [B, 3, H, W]
        _with_skip_counts,                               # (uint8 [B, 3, H, W], skipped since last batch)
    )
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,  # batched inside the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        # The DataLoader draws its workers' base seed from this generator; by default it would consume (and
        # depend on) the caller's global torch RNG. Our stages seed themselves, so this only keeps things tidy.
        generator=torch.Generator().manual_seed(_mix_seed(seed, rank)),
    )


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
    return ((images.float() - mean) / std).to(dtype)
