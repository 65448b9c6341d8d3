"""`dbot-bench data`'s two loaders, timed the same way on the same images: ours (webdataset shards through
:func:`dbot_ds.data.stream.build_train_loader`) and the usual torchvision ImageFolder + DataLoader reference
(its transform, its skipping of unreadable files), plus the shards -> class folders copy the reference reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torchvision import datasets, transforms

from dbot_ds.data.augment import IMAGE_KEYS, IMAGENET_MEAN, IMAGENET_STD, Augment, Views, normalize
from dbot_ds.data.manifest import expand_shards
from dbot_ds.data.stream import build_train_loader

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
               skipped: list[int] | None = None, teacher_size: int = 0) -> float:
    """img/s of build_train_loader (decode + crop in workers, uint8 batches) + normalize on :func:`_device`
    (``normalized=False``: the loader alone, i.e. what the workers deliver when a GPU does the normalising).
    ``teacher_size``: each crop also gives the teacher's view at that size (both views normalised).
    Unreadable samples the loader skipped are added to ``skipped[0]``."""
    device = _device()
    skipped = [0] if skipped is None else skipped

    def consume(item: tuple[torch.Tensor, object]) -> int:
        images, info = item
        skipped[0] += info.skipped
        views = images if isinstance(images, Views) else (images,)
        if normalized:
            for view in views:
                normalize(view.to(device, non_blocking=True))
        return views[0].shape[0]

    loader = build_train_loader(pattern, img_size=img_size, micro_batch=batch, num_workers=workers, seed=seed,
                                rank=0, world_size=1, augment=augment, teacher_size=teacher_size)
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
