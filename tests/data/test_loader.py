"""The streaming loader at scale: shards from other writers, pipe: sources, faults, and exact epochs over
2 ranks x 2 workers in real processes.

Samples here are solid-colour JPEGs whose colour encodes their id, so a sample survives crop, resize and flip
and can be recognised in a batch.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from testkit import COUNTS, colour_jpeg, deadline, ids_of, take, write_shards  # noqa: E402,F401

from dbot_ds.data.epochs import Geometry, StreamState
from dbot_ds.data.manifest import shard_counts
from dbot_ds.data.stream import build_train_loader, epoch_batches_per_rank, epoch_geometry, reader_ranges

# ---------------------------------------------------------------------------------- geometry (pure)

def test_epoch_geometry_and_reader_ranges_partition_the_samples():
    readers, per_reader = epoch_geometry(60, 2, 2, 4)
    assert (readers, per_reader) == (4, 16)                  # ceil(60 / 4) = 15 -> 16 (4 full batches)
    assert epoch_batches_per_rank(60, 2, 2, 4) == 8
    pieces = [reader_ranges(COUNTS, r, 4) for r in range(4)]
    covered = [(i, k) for p in pieces for i, a, b in p for k in range(a, b)]
    assert sorted(covered) == [(i, k) for i, n in enumerate(COUNTS) for k in range(n)]
    assert [sum(b - a for _, a, b in p) for p in pieces] == [15, 15, 15, 15]
    # The repeat bound: R x Q - N < R x micro_batch, for awkward sizes too.
    for n, world, workers, micro in [(1281167, 32, 10, 128), (1000, 3, 1, 7), (5, 1, 4, 2)]:
        r, q = epoch_geometry(n, world, workers, micro)
        assert q % micro == 0 and q * r >= n and q * r - n < r * micro


# ------------------------------------------------------------------------------ other writers, sources

def test_reads_webdataset_shardwriter_and_img2dataset_style_shards(tmp_path):
    with wds.ShardWriter(str(tmp_path / "sw-%06d.tar"), maxcount=5) as sink:     # webdataset's own writer
        for i in range(12):
            sink.write({"__key__": f"{i:04d}", "jpeg": colour_jpeg(i), "cls": i})
    got = take(f"{tmp_path}/sw-{{000000..000002}}.tar", 6)
    assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 for x, _ in got)
    assert set(sum((ids_of(x) for x, _ in got), [])) <= set(range(12))

    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:                    # img2dataset: jpg + txt + json
        for i in range(9):
            sink.write({"__key__": f"{i:09d}", "jpg": colour_jpeg(i), "txt": f"caption {i}",
                        "json": json.dumps({"url": f"http://x/{i}.jpg", "width": 40}).encode()})
    got = take(str(tmp_path / "00000.tar"), 5)
    assert set(sum((ids_of(x) for x, _ in got), [])) <= set(range(9)) and all(n.skipped == 0 for _, n in got)


def test_pipe_source(tmp_path):
    pattern = write_shards(tmp_path / "d")
    piped = "::".join(f"pipe:cat {tmp_path}/d/part-{s:03d}.tar" for s in range(6))
    direct = [ids_of(x) for x, _ in take(pattern, 10, resampled=False)]
    via_pipe = [ids_of(x) for x, _ in take(piped, 10, resampled=False, manifest=str(tmp_path / "d/manifest.json"))]
    assert via_pipe == direct
    with pytest.raises(ValueError, match="data.manifest"):
        take(piped, 1, resampled=False)


# ------------------------------------------------------------------------------------------ faults

def test_corrupt_samples_are_skipped_and_counted_exactly(tmp_path):
    whole = colour_jpeg(3)
    bad = {3: {"jpg": whole[: len(whole) // 2]},            # truncated JPEG
           17: {"jpg": b"not an image"},                    # garbage bytes
           40: {"txt": b"no image at all"}}                 # a sample without an image key
    pattern = write_shards(tmp_path / "d", extra=bad)
    per_epoch = epoch_batches_per_rank(60, 1, 0, 4)          # 15 batches: 60 images incl. 3 repeats
    got = take(pattern, 2 * per_epoch, resampled=False)
    assert sum(n.skipped for _, n in got) == 2 * len(bad)           # each bad sample counted once per epoch
    for epoch in (got[:per_epoch], got[per_epoch:]):
        ids = sum((ids_of(x) for x, _ in epoch), [])
        assert len(ids) == 60 and set(ids) == set(range(60)) - set(bad)


def test_unreachable_shard_is_skipped_and_training_goes_on(tmp_path):
    pattern = write_shards(tmp_path / "d")
    good = [f"pipe:cat {tmp_path}/d/part-{s:03d}.tar" for s in range(6)]
    mixed = "::".join(good[:3] + [f"pipe:cat {tmp_path}/d/missing.tar"] + good[4:])
    got = take(mixed, 40)                                    # resampled: the missing shard is drawn and skipped
    assert len(got) == 40 and sum(n.skipped for _, n in got) >= 1
    assert not set(sum((ids_of(x) for x, _ in got), [])) & set(range(30, 39))   # part-003 holds ids 30..38
    assert pattern


@pytest.mark.parametrize("resampled", [True, False])
def test_no_readable_shard_is_a_clear_error_not_a_hang(tmp_path, resampled):
    for s in range(2):
        (tmp_path / f"x-{s}.tar").write_bytes(b"\0" * 100 if s else b"")     # garbage and empty
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "x-0.tar", "num_samples": 4},
                                                                   {"name": "x-1.tar", "num_samples": 4}]}))
    with pytest.raises(RuntimeError, match=r"x-\{0\.\.1\}\.tar"):
        take(f"{tmp_path}/x-{{0..1}}.tar", 1, resampled=resampled)


def test_shard_counts_need_a_manifest(tmp_path):
    pattern = write_shards(tmp_path / "d")
    assert shard_counts(pattern) == COUNTS
    (tmp_path / "d/manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest"):
        shard_counts(pattern)


# ---------------------------------------------------------------- 2 ranks x 2 workers, real processes

def rank_stream(pattern: str, rank: int, n: int, start: int, out: str) -> None:
    """Runs in its own process: writes this rank's first `n` batches (as sample ids), with 2 loader workers."""
    loader = build_train_loader(pattern, img_size=16, micro_batch=4, num_workers=2, seed=7, rank=rank, world_size=2,
                                resampled=False, shuffle_buffer=8, start_batch=start)
    Path(out).write_text(json.dumps([ids_of(x) for x, _ in itertools.islice(iter(loader), n)]))


def run_ranks(tmp_path: Path, pattern: str, n: int, start: int) -> list[list[list[int]]]:
    """Both ranks at once, each a real (non-daemon) process that starts its own loader workers. They fork from a
    fork server that imported the loader once (spawn would import torch afresh for every rank)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["dbot_ds.data.stream", "test_loader"])
    tmp_path.mkdir(exist_ok=True)
    outs = [str(tmp_path / f"rank{r}-start{start}.json") for r in (0, 1)]
    procs = [ctx.Process(target=rank_stream, args=(pattern, r, n, start, outs[r])) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, "a rank's loader failed or hung"
    return [json.loads(Path(o).read_text()) for o in outs]


@pytest.mark.slow
def test_two_ranks_two_workers_exact_epochs_and_resume(tmp_path):
    pattern = write_shards(tmp_path / "d")
    per_epoch = epoch_batches_per_rank(60, 2, 2, 4)          # 8 batches of 4 per rank per epoch
    readers, per_reader = epoch_geometry(60, 2, 2, 4)
    first = run_ranks(tmp_path, pattern, 2 * per_epoch, 0)
    resumed = run_ranks(tmp_path, pattern, per_epoch, 5)     # (also: the same seed gives the same order)
    assert all(len(r) == 2 * per_epoch for r in first)       # identical step counts per rank
    for e in range(2):
        seen = [i for rank in first for batch in rank[e * per_epoch:(e + 1) * per_epoch] for i in batch]
        assert set(seen) == set(range(60))                   # every sample once per epoch ...
        repeats = len(seen) - 60
        assert repeats == readers * per_reader - 60 == 4     # ... plus exactly R x Q - N repeats,
        assert repeats < readers * 4                         # bounded by readers x micro_batch
    epoch0 = [i for rank in first for batch in rank[:per_epoch] for i in batch]
    epoch1 = [i for rank in first for batch in rank[per_epoch:] for i in batch]
    assert epoch0 != epoch1                                  # a new shard and sample order each epoch
    for rank in (0, 1):                                      # resume after 5 batches continues exactly
        assert resumed[rank] == first[rank][5:5 + per_epoch]


# ------------------------------------------------------------- exact epochs carried to another layout

def stream_batches(pattern: str, geom: Geometry, spec: dict, start: int, n: int) -> list[list[tuple]]:
    """Each rank's next `n` batches as (sample ids, BatchInfo), all ranks in this process (no loader workers)."""
    out = []
    for rank in range(geom.world_size):
        loader = build_train_loader(pattern, img_size=16, micro_batch=geom.micro_batch, num_workers=0, seed=3,
                                    rank=rank, world_size=geom.world_size, resampled=False,
                                    shuffle_buffer=geom.shuffle_buffer, start_batch=start, spec=spec)
        with deadline(60):
            out.append([(ids_of(x), info) for x, info in itertools.islice(iter(loader), n)])
    return out


@pytest.mark.parametrize("old,new", [((2, 4), (1, 4)), ((1, 4), (3, 4)), ((2, 4), (2, 2)), ((3, 2), (2, 4))])
def test_epoch_continues_on_another_layout_without_repeats_or_gaps(tmp_path, old, new):
    """Stop mid-epoch on one (ranks, micro-batch) layout, carry the position over to another, twice in a row:
    the samples consumed before plus the block the new layout reads are every sample of the epoch exactly once
    (plus only the new layout's own padding repeats), and the next epoch is whole."""
    pattern = write_shards(tmp_path / "d")
    counts = shard_counts(pattern)
    g1 = Geometry(old[0], 0, old[1], 8)
    state = StreamState.fresh(g1)
    before = stream_batches(pattern, g1, state.spec, 0, 3)
    for rank in before:
        for _, info in rank:
            state.positions[info.reader] = [info.unit, info.drawn]
    seen = Counter(i for rank in before for ids, _ in rank for i in ids)
    assert max(seen.values()) == 1 and sum(seen.values()) == 3 * old[1] * old[0]

    g2 = Geometry(new[0], 0, new[1], 8)
    resumed = state.continued_on(g2, counts, seed=3)
    assert resumed.spec["block"] is not None and resumed.spec["first_epoch"] == 1
    block_len = 60 - sum(seen.values())
    per_rank = g2.quota(block_len) // new[1]
    after = stream_batches(pattern, g2, resumed.spec, 0, per_rank + epoch_batches_per_rank(60, new[0], 0, new[1]))
    block = Counter(i for rank in after for ids, info in rank[:per_rank] for i in ids)
    assert all(info.unit == 0 for rank in after for _, info in rank[:per_rank])
    assert set(block) | set(seen) == set(range(60)) and not set(block) & set(seen)      # no gap, no repeat
    assert sum(block.values()) - block_len == g2.readers * g2.quota(block_len) - block_len < g2.readers * new[1]
    epoch1 = Counter(i for rank in after for ids, info in rank[per_rank:] for i in ids)
    assert set(epoch1) == set(range(60)) and all(info.unit == 1 for rank in after for _, info in rank[per_rank:])

    # Stopped again inside the block, the block's remainder carries over the same way (a chain of two).
    state2 = StreamState.fresh(g2, resumed.spec)
    for rank in after:
        for _, info in rank[:1]:
            state2.positions[info.reader] = [info.unit, info.drawn]
    in_block = Counter(i for rank in after for ids, _ in rank[:1] for i in ids)
    again = state2.continued_on(g1, counts, seed=3)
    rest = g1.quota(block_len - sum(in_block.values()))
    tail = stream_batches(pattern, g1, again.spec, 0, rest // old[1])
    tail_ids = Counter(i for rank in tail for ids, _ in rank for i in ids)
    assert set(tail_ids) | set(in_block) | set(seen) == set(range(60))
    assert not set(tail_ids) & (set(in_block) | set(seen))
