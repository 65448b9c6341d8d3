"""One shard's raw samples (local, `pipe:`, http, ...) as webdataset dicts, and the per-process accounting of what
could not be read: skipped samples and shards (rate-limited warnings), stalled remote shards, and the limits past
which the data counts as broken (:class:`_BrokenData`) instead of noisy.

Separate from stream.py (which turns these samples into batches) because the skip counters are shared state: the
reader here and the decoder (augment.py) report to them, the stream attaches their counts to its batches, and
tests reset them; they live in this one module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from .manifest import _local_path
from .remote import ShardStalled, _open_remote

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0
# If this many samples/shards in a row fail, the data is broken rather than noisy: fail loudly instead of
# spinning forever on an endless stream that never yields a batch.
_MAX_CONSECUTIVE_SKIPS = 1000
# A remote shard (http, pipe:, ...) that sends no byte for `stall_timeout_s` is a failed shard. Each stall costs
# that long, so a few in a row (with no readable image between them) mean the source is down: fail the run after
# _MAX_CONSECUTIVE_STALLS x stall_timeout_s instead of after 1000 of them.
DEFAULT_STALL_TIMEOUT_S = 30.0
_MAX_CONSECUTIVE_STALLS = 3


# ------------------------------------------------------------------------------------ error handling

class _BrokenData(RuntimeError):
    """Nothing readable for a long while: broken data, not noise. Re-raised naming the shard pattern."""


_skipped = 0
_consecutive_skips = 0
_consecutive_stalls = 0
_last_warning = 0.0


def skipped_samples() -> int:
    """Samples (and unreadable shards/tar members) skipped so far in this process (per DataLoader worker)."""
    return _skipped


def _skip(reason: str, warn: bool = True) -> None:
    """Count a skipped sample and warn at most once every ``_WARN_EVERY_S`` seconds per process."""
    global _skipped, _consecutive_skips, _last_warning
    _skipped += 1
    _consecutive_skips += 1
    if _consecutive_skips > _MAX_CONSECUTIVE_SKIPS:
        raise _BrokenData(f"{_consecutive_skips} samples in a row could not be read (last: {reason}); "
                           "the shards look broken.")
    now = time.monotonic()
    if warn and now - _last_warning >= _WARN_EVERY_S:
        _last_warning = now
        log.warning("skipping unreadable sample (%d skipped so far in pid %d): %s", _skipped, os.getpid(), reason)


def _skip_handler(exn: Exception) -> bool:
    """webdataset handler: count and continue (wds.warn_and_continue sleeps 0.5 s per error)."""
    _skip(repr(exn)[:300])
    return True


def _stalled(reason: str, count: bool) -> None:
    """A shard stopped sending. Each stall cost the whole stall limit, so each is warned (no rate limit) and the
    shard counts as one skip; `_MAX_CONSECUTIVE_STALLS` in a row with no readable image between them mean the
    source is down. Padding passes (count=False) still count towards that limit, or they could wait for
    readers x shards stalls."""
    global _consecutive_stalls
    _consecutive_stalls += 1
    log.warning("shard stalled and skipped (%d in a row, pid %d): %s", _consecutive_stalls, os.getpid(), reason)
    if count:
        _skip(reason, warn=False)
    if _consecutive_stalls >= _MAX_CONSECUTIVE_STALLS:
        raise _BrokenData(f"{_consecutive_stalls} shards in a row stalled (last: {reason})")


def _read_ok() -> None:
    """A sample was read and decoded: the skips and stalls in a row are over (the decoder calls this)."""
    global _consecutive_skips, _consecutive_stalls
    _consecutive_skips = _consecutive_stalls = 0


# ------------------------------------------------------------------------------------------- reading

def _raw_samples(url: str, start: int = 0, stop: int | None = None, count: bool = True,
                 stall_s: float = DEFAULT_STALL_TIMEOUT_S, keep: frozenset[int] | None = None) -> Iterator[dict]:
    """Samples [start, stop) of one shard (local, pipe:, http ...), only those in `keep` if given. A shard that cannot be opened or read is
    skipped through the handler; one that yields nothing counts as one skip too (else a reader could spin
    forever on empty shards). A remote one that sends nothing for `stall_s` seconds ends there, as one skip."""
    errors = 0

    def handler(exn: Exception) -> bool:
        nonlocal errors
        if isinstance(exn, ShardStalled):
            raise exn        # out through every webdataset layer (each would call the handler), counted once below
        errors += 1
        return _skip_handler(exn) if count else True

    stream = None
    if _local_path(url) is None:         # local files keep webdataset's plain open: no process, nothing to watch
        try:
            stream = _open_remote(url, stall_s)
        except Exception as exn:  # noqa: BLE001 - as webdataset's url_opener: an unopenable shard is skipped
            handler(exn)
            return
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)
    else:
        samples = wds.tarfile_to_samples(handler=handler)([{"url": url}])
    n = 0
    try:
        for i, sample in enumerate(samples):
            if stop is not None and i >= stop:
                break
            if i >= start and (keep is None or i in keep):
                n += 1
                yield sample
    except ShardStalled as exn:
        _stalled(exn.args[0], count)     # args[0]: our message; webdataset appends the stream and url to args
        return
    finally:                             # also when the consumer stops early: no reader process outlives its shard
        if stream is not None and hasattr(stream, "close"):
            stream.close()
    if n == 0 and errors == 0 and count:
        _skip(f"shard {url} gave no samples in [{start}, {stop})")
