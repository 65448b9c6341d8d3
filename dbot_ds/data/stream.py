"""WebDataset training stream for dBOT pre-training.

The stream is infinite and fully determined by ``seed``: shard sampling, the sample shuffle buffer and the
augmentations each draw from their own RNG seeded from (seed, rank, dataloader worker). The trainer counts
steps itself, so every rank runs the same number of steps regardless of shard sizes.

The layers below it: manifest.py (shard patterns, sample counts), shard_reader.py (one shard's raw samples, skip
and stall accounting; remote.py for remote shards), augment.py (decode, augmentation, normalisation).

Batches leave the workers as uint8 ``[B, 3, H, W]`` (4x less host->device traffic than float32);
:func:`dbot_ds.data.augment.normalize` turns them into normalised floats on the GPU.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .augment import Augment, Views, _Decoder
from .epochs import (  # noqa: F401 - part of this module's API
    DEFAULT_OPEN_SHARDS,
    Geometry,
    Piece,
    Unit,
    block_units,
    epoch_batches_per_rank,
    epoch_geometry,
    epoch_units,
    interleaved,
    mix_seed,
    new_spec,
    reader_ranges,
    shard_runs,
    shuffled,
    slice_pieces,
)
from .manifest import expand_shards, shard_counts
from .remote import kill_readers_on_sigterm
from .shard_reader import DEFAULT_STALL_TIMEOUT_S, _BrokenData, _raw_samples, skipped_samples

# Independent RNG streams per worker, so e.g. changing the shuffle buffer does not change shard order.
_SHARD_STREAM, _SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------------- seeds and workers

def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------------------- the readers

def _resampled_images(shards: list[str], decode: _Decoder, *, seed: int, reader: int, shuffle_buffer: int,
                      stall_s: float = DEFAULT_STALL_TIMEOUT_S, open_shards: int = DEFAULT_OPEN_SHARDS):
    """Endless images: shards drawn with replacement by a per-reader RNG, `open_shards` of them read at once
    (interleaved, so shards of one class each still mix), samples shuffled in a buffer."""
    rng = random.Random(mix_seed(seed, reader, _SHARD_STREAM))
    draws = (_raw_samples(rng.choice(shards), stall_s=stall_s) for _ in itertools.count())
    index = 0
    for sample in shuffled(interleaved(draws, open_shards), shuffle_buffer, mix_seed(seed, reader, _SHUFFLE_STREAM)):
        image = decode(sample, mix_seed(seed, reader, _AUGMENT_STREAM, index))
        if image is not None:
            index += 1
            yield image


def _read_pieces(shards: list[str], pieces: list[Piece], count: bool, stall_s: float, open_shards: int
                 ) -> Iterator[dict]:
    """The samples of `pieces`, one pass over a shard per run of its pieces (epochs.shard_runs), `open_shards`
    runs read at once and interleaved: the order epochs.feed_order replays."""
    def run_samples(run: list[Piece]) -> Iterator[dict]:
        lo, hi = run[0][1], run[-1][2]
        keep = None if len(run) == 1 else frozenset(i for _, a, b in run for i in range(a, b))
        return _raw_samples(shards[run[0][0]], lo, hi, count=count, stall_s=stall_s, keep=keep)

    return interleaved((run_samples(run) for run in shard_runs(pieces)), open_shards)


def _unit_images(shards: list[str], unit: Unit, decode: _Decoder, *, seed: int, reader: int, readers: int,
                 per_reader: int, skip: int, shuffle_buffer: int, stall_s: float = DEFAULT_STALL_TIMEOUT_S,
                 open_shards: int = DEFAULT_OPEN_SHARDS) -> Iterator[tuple[torch.Tensor, int]]:
    """Exactly `per_reader` (image, drawn) of one unit (an epoch or a block, see epochs.py) for one reader, the
    first `skip` images only validated (resume). `drawn`: samples the shuffle buffer has handed out so far.

    Pass 1 reads the reader's own slice (shuffled); corrupt samples are counted once here. Later passes pad up
    to `per_reader` by re-reading the slice in order without counting again, and if the whole slice is
    unreadable (or empty), the slices after it."""
    own = slice_pieces(unit.pieces, reader, readers)
    produced, drawn = 0, 0

    def emit(samples: Iterator[dict], count: bool, first_pass: bool) -> Iterator[tuple[torch.Tensor, int]]:
        nonlocal produced, drawn
        for sample in samples:
            if produced == per_reader:
                return
            drawn += first_pass
            replay = produced < skip        # resumed: already consumed (and counted) before the restart
            ok = decode(sample, mix_seed(seed, *unit.key, reader, produced), count=count and not replay,
                        validate_only=replay)
            if ok is None:
                continue
            produced += 1
            if produced > skip:
                yield ok, drawn

    def slice_samples(r: int, count: bool) -> Iterator[dict]:
        return _read_pieces(shards, slice_pieces(unit.pieces, r, readers), count, stall_s, open_shards)

    yield from emit(shuffled(_read_pieces(shards, own, True, stall_s, open_shards), shuffle_buffer,
                             unit.shuffle_seed(seed, reader)), True, True)
    drawn = sum(b - a for _, a, b in own)     # pass 1 is over: the whole slice counts as drawn
    for attempt in range(readers):          # padding passes: own slice first, then the next slices
        if produced == per_reader:
            return
        before = produced
        while produced < per_reader:
            yield from emit(slice_samples((reader + attempt) % readers, False), False, False)
            if produced == before:
                break                        # this slice is unreadable: try the next one
    if produced < per_reader:
        raise _BrokenData("no readable sample in any shard")


class BatchInfo(NamedTuple):
    """What comes with each batch: samples its worker skipped since its previous batch, and (exact epochs) the
    position of the reader that made it after its last image: (reader, unit, drawn), see epochs.py."""
    skipped: int
    reader: int = 0
    unit: int = 0
    drawn: int = 0


class _Stream(torch.utils.data.IterableDataset):
    """One rank's stream; in each DataLoader worker it runs that worker's reader and batches inside it."""

    def __init__(self, pattern: str, shards: list[str], *, img_size: int, micro_batch: int, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int, augment: Augment, start_batch: int, stall_s: float,
                 open_shards: int, counts: list[int] | None = None, spec: dict | None = None,
                 block: list[Unit] | None = None, teacher_size: int = 0):
        self.pattern, self.shards, self.counts, self.spec, self.block = pattern, shards, counts, spec, block
        self.micro_batch, self.seed, self.rank, self.world_size = micro_batch, seed, rank, world_size
        self.shuffle_buffer, self.start_batch, self.stall_s = shuffle_buffer, start_batch, stall_s
        self.open_shards = open_shards
        self.decode = _Decoder(img_size, augment, teacher_size)

    def _units(self) -> Iterator[Unit]:
        return itertools.chain(self.block, epoch_units(self.spec["first_epoch"], self.counts, self.seed))

    def images(self) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]:
        worker, workers = _worker()
        # The DataLoader takes batches from its workers round-robin, starting with worker 0: worker w makes
        # batches w, w + W, ... After `start_batch` batches, the next one belongs to reader start_batch % W, so
        # the workers of a resumed stream take over the readers rotated by that much.
        worker = (worker + self.start_batch) % workers
        reader = self.rank * workers + worker
        if self.spec is None:
            for image in _resampled_images(self.shards, self.decode, seed=self.seed, reader=reader,
                                           shuffle_buffer=self.shuffle_buffer, stall_s=self.stall_s,
                                           open_shards=self.open_shards):
                yield image, (reader, 0, 0)
            return
        geom = Geometry(self.world_size, workers, self.micro_batch, self.shuffle_buffer, self.open_shards)
        done = (self.start_batch // workers + (1 if worker < self.start_batch % workers else 0)) * self.micro_batch
        for index, unit in enumerate(self._units()):
            quota = geom.quota(unit.samples)
            if done >= quota:                    # resumed past this unit
                done -= quota
                continue
            for image, drawn in _unit_images(self.shards, unit, self.decode, seed=self.seed, reader=reader,
                                             readers=geom.readers, per_reader=quota, skip=done,
                                             shuffle_buffer=self.shuffle_buffer, stall_s=self.stall_s,
                                             open_shards=self.open_shards):
                yield image, (reader, index, drawn)
            done = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, BatchInfo]]:
        try:
            yield from _with_skip_counts(_full_batches(self.images(), self.micro_batch))
        except _BrokenData as e:
            raise RuntimeError(f"{e}: the data of {self.pattern!r} could not be read (see the warnings above for "
                               "the errors); check the paths, credentials of pipe:/http sources, and the files") from None


def _full_batches(images: Iterator[tuple[torch.Tensor, tuple]], size: int) -> Iterator[tuple[torch.Tensor, tuple]]:
    """(stacked batch of `size`, the position after its last image), each yielded as soon as it is full.
    (webdataset's `batched` yields a batch only when the next image arrives, so the skips met while reading
    that image were counted one batch early.)"""
    while len(batch := list(itertools.islice(images, size))) == size:
        views = [image for image, _ in batch]
        stacked = Views(*map(torch.stack, zip(*views))) if isinstance(views[0], Views) else torch.stack(views)
        yield stacked, batch[-1][1]


def _with_skip_counts(batches: Iterator[tuple[torch.Tensor, tuple]]) -> Iterator[tuple[torch.Tensor, BatchInfo]]:
    """Attach to each batch the samples this worker skipped since its previous batch: the counter lives in the
    worker process, and this is how the count reaches the trainer."""
    seen = skipped_samples()
    for images, position in batches:
        yield images, BatchInfo(skipped_samples() - seen, *position)
        seen = skipped_samples()


# ------------------------------------------------------------------------------------------- loader

def build_train_loader(pattern: str, *, img_size: int, micro_batch: int, num_workers: int, seed: int,
                       rank: int, world_size: int, resampled: bool = True, shuffle_buffer: int = 1000,
                       augment: Augment = Augment(), start_batch: int = 0, manifest: str | None = None,
                       stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, spec: dict | None = None,
                       open_shards: int = DEFAULT_OPEN_SHARDS, teacher_size: int = 0) -> torch.utils.data.DataLoader:
    """INFINITE iterable of (uint8 image batch [micro_batch, 3, img_size, img_size] (CPU, pinned if CUDA),
    BatchInfo: samples skipped as unreadable since the producing worker's previous batch, reader position).
    With teacher_size T (a teacher of another input size), the batch is `Views(student [micro_batch, 3, img_size,
    img_size], teacher [micro_batch, 3, T, T])`, both cut from each image's one crop.

    resampled=True: shards drawn with replacement; reproducible for a fixed (seed, rank, num_workers); resume
    by building a new stream with a new seed. resampled=False: epochs of exact coverage, shard order seeded by
    (seed, epoch), after the block `spec` owes (see epochs.py; None: a fresh stream from epoch 0); `start_batch` =
    micro-batches this rank already consumed from that stream, so a resumed stream continues exactly where the
    old one stopped. The second item of each pair is a `BatchInfo`.

    stall_timeout_s: a remote shard (http(s), `pipe:`, ...) that sends no byte for this many seconds is skipped
    as failed; `_MAX_CONSECUTIVE_STALLS` stalled shards in a row fail the stream with an error naming `pattern`.
    augment: crop scale, flip, interpolation, colour jitter (see :class:`Augment`).
    open_shards: shards (runs of one shard's samples) each reader reads at once, interleaved before the shuffle
    buffer, so that shards holding one class each still give class-mixed batches; 1 = one after another. In
    exact-epoch mode it is part of the reader layout (epochs.Geometry), which a resume replays.
    """
    if not stall_timeout_s > 0:
        raise ValueError(f"data.stall_timeout_s must be > 0 seconds, got {stall_timeout_s}")
    if open_shards < 1:
        raise ValueError(f"data.open_shards must be >= 1, got {open_shards}")
    shards = expand_shards(pattern)
    counts, block = None, None
    if not resampled:
        counts = shard_counts(pattern, manifest)
        readers = world_size * max(num_workers, 1)
        if len(shards) < readers:
            raise ValueError(
                f"data.resampled=false needs at least one shard per reader, but {len(shards)} shards < "
                f"{world_size} ranks x {max(num_workers, 1)} workers = {readers}. Write more (smaller) shards, "
                "use fewer data workers (data.num_workers), or set data.resampled=true.")
        spec = spec or new_spec()
        block = block_units(spec, counts, seed)        # computed once here, not in every worker
    stream = _Stream(pattern, shards, img_size=img_size, micro_batch=micro_batch, seed=seed, rank=rank,
                     world_size=world_size, shuffle_buffer=shuffle_buffer, augment=augment.check(),
                     start_batch=start_batch, stall_s=stall_timeout_s, open_shards=open_shards, counts=counts,
                     spec=None if resampled else spec, block=block, teacher_size=teacher_size)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # batched inside the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=kill_readers_on_sigterm,      # a terminated worker leaves no reader process behind
        # The DataLoader draws worker base seeds from this generator instead of the caller's global RNG.
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
    )
