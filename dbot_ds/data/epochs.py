"""Exact-epoch streams (data.resampled=false): which samples each reader reads, and how a stream's position
carries over to another reader layout (world size, loader workers, micro-batch).

An epoch holds every sample once, in an order seeded by (seed, epoch): shards shuffled, samples in shard order.
The R = world_size x workers readers each own a contiguous 1/R of that order and pass it through a shuffle
buffer. A *stream* is a sequence of *units*: an optional *block* (the samples an interrupted stream still owed
when it resumed on another layout), then the full epochs first_epoch, first_epoch + 1, ... Each reader yields
Q = micro_batch x ceil(ceil(T / R) / micro_batch) images of a unit of T samples, so every rank gets the same
number of whole batches; the last few are repeats from the reader's own slice (fewer than R x micro_batch a unit).

Each reader feeds its buffer from up to `open_shards` of its slice's shards at once, one sample from each in
turn (:func:`interleaved`), so that shards written one class each still give class-mixed batches. That order is a
fixed function of the slice (:func:`feed_order`), which the replay below relies on.

A reader's position is (unit, drawn): how many samples its shuffle buffer has handed out in that unit, readable
or not. The buffer's output order depends only on its seed and its number of inputs, so the positions alone say
which samples were consumed, without reading a shard. :func:`carry_over` turns them into a block of exactly the
samples still owed, which the readers of the new layout share: no sample of the interrupted epoch is repeated or
lost because the reader count changed. (A tar member too broken to parse is dropped before the buffer and shifts
the replay within its reader's slice; such members are logged as skipped samples.)

Specs are plain JSON (they live in the checkpoint's client state):
    {"first_epoch": e, "block": null | {"from": <older spec>,
                                          "geometry": [world, workers, micro_batch, buffer, open_shards],
                                          "positions": [[unit, drawn] per old reader]}}
(A geometry of 4 numbers predates `open_shards` and means 1: shards read one after another.)
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

Piece = tuple[int, int, int]        # (shard index, first sample, end sample): samples [first, end) of one shard
_BLOCK = 0xB10C                     # seed domain of blocks, apart from the epoch numbers
DEFAULT_OPEN_SHARDS = 16            # shards each reader reads at once (data.open_shards)


def mix_seed(*ints: int) -> int:
    """A well-mixed 63-bit seed from a few ints. Unlike hash() of strings this is stable across processes."""
    state = np.random.SeedSequence([int(i) % 2**63 for i in ints]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def shuffled(items: Iterator, bufsize: int, seed: int) -> Iterator:
    """webdataset's buffer shuffle, seeded; its output order depends only on `seed` and the number of items."""
    if bufsize <= 1:
        return items
    return wds.shuffle(bufsize, initial=bufsize, rng=random.Random(seed))(items)


def interleaved(streams: Iterable[Iterable], width: int) -> Iterator:
    """One item from each of up to `width` open streams in turn; an exhausted stream's slot takes the next one.

    The order depends only on the streams' lengths, so a reader (tar samples) and the replay (sample ids) agree.
    A stream is opened (first pulled) only when it gets a slot, and the open ones are closed if the consumer
    stops early, so no shard reader outlives its use."""
    pending = iter(streams)
    slots = [iter(s) for s in itertools.islice(pending, max(width, 1))]
    i = 0
    try:
        while slots:
            i %= len(slots)
            try:
                item = next(slots[i])
            except StopIteration:
                fresh = next(pending, None)
                if fresh is None:
                    del slots[i]
                else:
                    slots[i] = iter(fresh)
                continue
            yield item
            i += 1
    finally:
        for s in slots:
            if hasattr(s, "close"):
                s.close()


# ------------------------------------------------------------------------------------------ geometry

@dataclass(frozen=True)
class Geometry:
    """The reader layout of a stream. workers = DataLoader workers per rank (0: the rank reads itself)."""
    world_size: int
    workers: int
    micro_batch: int
    shuffle_buffer: int
    open_shards: int = DEFAULT_OPEN_SHARDS

    @classmethod
    def from_list(cls, values: list[int]) -> Geometry:
        """As stored in specs and checkpoints; 4 numbers predate open_shards, when readers read 1 shard at a time."""
        return cls(*values) if len(values) == 5 else cls(*values, open_shards=1)

    @property
    def readers(self) -> int:
        return self.world_size * max(self.workers, 1)

    def quota(self, samples: int) -> int:
        """Images each reader yields from a unit of `samples` samples: whole micro-batches, >= its slice."""
        per_reader = -(-samples // self.readers)
        return self.micro_batch * -(-per_reader // self.micro_batch)

    def as_list(self) -> list[int]:
        return [self.world_size, self.workers, self.micro_batch, self.shuffle_buffer, self.open_shards]


def epoch_geometry(num_samples: int, world_size: int, num_workers: int, micro_batch: int) -> tuple[int, int]:
    """(readers, images per reader per epoch) of the exact-epoch stream; repeats per epoch = R x Q - N."""
    g = Geometry(world_size, num_workers, micro_batch, 0)
    return g.readers, g.quota(num_samples)


def epoch_batches_per_rank(num_samples: int, world_size: int, num_workers: int, micro_batch: int) -> int:
    """Micro-batches one rank receives per full epoch."""
    _, per_reader = epoch_geometry(num_samples, world_size, num_workers, micro_batch)
    return per_reader // micro_batch * max(num_workers, 1)


# -------------------------------------------------------------------------------------------- pieces

def epoch_pieces(counts: list[int], seed: int, epoch: int) -> list[Piece]:
    """Sample order of one epoch: whole shards, in an order seeded by (seed, epoch) only (same on every rank)."""
    order = list(range(len(counts)))
    random.Random(mix_seed(seed, epoch)).shuffle(order)
    return [(i, 0, counts[i]) for i in order]


def slice_pieces(pieces: list[Piece], reader: int, readers: int) -> list[Piece]:
    """Reader's contiguous share [r T / R, (r + 1) T / R) of the T samples of `pieces`, as pieces."""
    total = sum(b - a for _, a, b in pieces)
    lo, hi = reader * total // readers, (reader + 1) * total // readers
    out, offset = [], 0
    for shard, a, b in pieces:
        x, y = max(lo, offset), min(hi, offset + b - a)
        if x < y:
            out.append((shard, a + x - offset, a + y - offset))
        offset += b - a
    return out


def reader_ranges(counts: list[int], reader: int, readers: int) -> list[Piece]:
    """(index into counts, first, end) pieces of reader's share of shards taken whole in the given order."""
    return slice_pieces([(i, 0, n) for i, n in enumerate(counts)], reader, readers)


def shard_runs(pieces: list[Piece]) -> list[list[Piece]]:
    """`pieces` cut into runs that one pass over a shard reads: consecutive pieces of one shard, going forwards.
    (A block of scattered leftovers then costs one read per shard, not one per piece.)"""
    runs: list[list[Piece]] = []
    for p in pieces:
        if runs and runs[-1][-1][0] == p[0] and p[1] >= runs[-1][-1][2]:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def feed_order(pieces: list[Piece], open_shards: int) -> list[int]:
    """The order in which a reader feeds the samples of `pieces` to its shuffle buffer, as indices into
    `_samples(pieces)`: its shard runs read `open_shards` at a time, interleaved (the reader's own order)."""
    bounds = list(itertools.accumulate((sum(b - a for _, a, b in run) for run in shard_runs(pieces)), initial=0))
    return list(interleaved((range(lo, hi) for lo, hi in zip(bounds, bounds[1:])), open_shards))


def _samples(pieces: list[Piece]) -> list[tuple[int, int]]:
    return [(shard, i) for shard, a, b in pieces for i in range(a, b)]


def _pieces(samples: list[tuple[int, int]]) -> list[Piece]:
    """Runs of consecutive samples of one shard, merged into pieces (the order is kept)."""
    out: list[list[int]] = []
    for shard, i in samples:
        if out and out[-1][0] == shard and out[-1][2] == i:
            out[-1][2] += 1
        else:
            out.append([shard, i, i + 1])
    return [tuple(p) for p in out]


# -------------------------------------------------------------------------------------------- units

@dataclass(frozen=True)
class Unit:
    """One pass over `pieces`, split between the readers. `key` seeds the shuffle and augmentations:
    (epoch,) for an epoch, (_BLOCK, depth, first_epoch) for a block."""
    key: tuple[int, ...]
    pieces: list[Piece]

    @property
    def samples(self) -> int:
        return sum(b - a for _, a, b in self.pieces)

    def shuffle_seed(self, seed: int, reader: int) -> int:
        return mix_seed(seed, *self.key, reader)


def new_spec() -> dict:
    """The stream of a fresh run: epochs 0, 1, ..."""
    return {"first_epoch": 0, "block": None}


def _depth(spec: dict) -> int:
    return 0 if spec["block"] is None else 1 + _depth(spec["block"]["from"])


def block_units(spec: dict, counts: list[int], seed: int) -> list[Unit]:
    """The spec's block as a list of 0 or 1 units (never empty: carry_over writes no block that owes nothing)."""
    block = spec["block"]
    if block is None:
        return []
    owed = _owed(block["from"], Geometry.from_list(block["geometry"]), block["positions"], counts, seed)[0]
    return [Unit((_BLOCK, _depth(spec), spec["first_epoch"]), owed)]


def epoch_units(first_epoch: int, counts: list[int], seed: int) -> Iterator[Unit]:
    for epoch in itertools.count(first_epoch):
        yield Unit((epoch,), epoch_pieces(counts, seed, epoch))


def units(spec: dict, counts: list[int], seed: int) -> Iterator[Unit]:
    """The stream's units in order: its block, if any, then full epochs forever."""
    return itertools.chain(block_units(spec, counts, seed), epoch_units(spec["first_epoch"], counts, seed))


def _owed(spec: dict, geom: Geometry, positions: list[list[int]], counts: list[int], seed: int
          ) -> tuple[list[Piece], int | None]:
    """(samples the stream `spec`, read with `geom`, still owed at `positions`, in reading order; the unit index
    after the last one any reader has started, None if none has started any)."""
    if len(positions) != geom.readers:
        raise ValueError(f"{len(positions)} reader positions for a layout of {geom.readers} readers")
    touched = [u if d > 0 else u - 1 for u, d in positions]          # last unit each reader drew from
    last = max(touched)
    if last < 0:
        return [], None
    first = min(u for u, _ in positions)
    owed: list[tuple[int, int]] = []
    for index, unit in enumerate(itertools.islice(units(spec, counts, seed), last + 1)):
        if index < first:
            continue
        for r, (u, drawn) in enumerate(positions):
            own = slice_pieces(unit.pieces, r, geom.readers)
            ids = _samples(own)
            consumed = len(ids) if u > index else drawn if u == index else 0
            if consumed >= len(ids):
                continue
            if consumed == 0:
                owed.extend(ids)
                continue
            fed = feed_order(own, geom.open_shards)                   # buffer input i is sample ids[fed[i]]
            order = list(shuffled(iter(range(len(ids))), geom.shuffle_buffer, unit.shuffle_seed(seed, r)))
            # The buffer's leftovers + the unread tail, in slice order (few long runs per shard, not interleaved).
            owed.extend(ids[j] for j in sorted(fed[i] for i in order[consumed:]))
    return _pieces(owed), last + 1


def carry_over(spec: dict, geom: Geometry, positions: list[list[int]], counts: list[int], seed: int) -> dict:
    """The spec of a stream that continues `spec` (read with `geom`, stopped at `positions`) on any new layout:
    a block of exactly the samples still owed by every unit any reader had started, then the next epochs."""
    owed, after = _owed(spec, geom, positions, counts, seed)
    if after is None:                        # nothing drawn yet: the same stream, read by the new layout
        return spec
    next_epoch = spec["first_epoch"] + after - (spec["block"] is not None)    # unit index -> epoch number
    if not owed:
        return {"first_epoch": next_epoch, "block": None}
    return {"first_epoch": next_epoch,
            "block": {"from": spec, "geometry": geom.as_list(), "positions": [list(p) for p in positions]}}



# ------------------------------------------------------------------------------------- a run's position

@dataclass
class StreamState:
    """Where a run is in its exact-epoch stream; saved in every checkpoint (`to_dict`).

    batches: micro-batches each rank has consumed from this stream (the same on every rank).
    positions: [unit, drawn] per reader after the last batch the trainer consumed from it. A rank keeps its own
    readers current; `merged` combines the ranks' views before a checkpoint."""
    spec: dict
    geometry: Geometry
    batches: int
    positions: list[list[int]] | None       # None: a checkpoint from before positions were recorded

    @classmethod
    def fresh(cls, geometry: Geometry, spec: dict | None = None) -> StreamState:
        return cls(spec or new_spec(), geometry, 0, [[0, 0] for _ in range(geometry.readers)])

    def consumed(self, reader: int, unit: int, drawn: int) -> None:
        """Record one micro-batch from `reader`, whose position after it is (unit, drawn)."""
        self.batches += 1
        if self.positions is not None:
            self.positions[reader] = [unit, drawn]

    def own_readers(self, rank: int) -> range:
        per_rank = max(self.geometry.workers, 1)
        return range(rank * per_rank, (rank + 1) * per_rank)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "geometry": self.geometry.as_list(), "batches": self.batches,
                "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(d["spec"], Geometry.from_list(d["geometry"]), d["batches"], d["positions"])

    def continued_on(self, geometry: Geometry, counts: list[int], seed: int) -> StreamState:
        """This position, resumed with `geometry`: the same stream if the layout is the same, else a new stream
        whose block owes exactly the samples this one had not yet handed out (see carry_over)."""
        if geometry == self.geometry:
            return self
        if self.positions is None:
            raise ValueError("this checkpoint predates per-reader stream positions, so its exact-epoch stream "
                             f"(data.resampled=false) can only continue on its own layout {self.geometry}")
        return StreamState.fresh(geometry, carry_over(self.spec, self.geometry, self.positions, counts, seed))
