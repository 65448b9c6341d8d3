"""WebDataset training stream for dBOT pre-training.

The stream is infinite and fully determined by ``seed``: shard sampling, the sample shuffle buffer and the
augmentations each draw from their own RNG seeded from (seed, rank, dataloader worker). The trainer counts
steps itself, so every rank runs the same number of steps regardless of shard sizes.

Batches leave the workers as uint8 ``[B, 3, H, W]`` (4x less host->device traffic than float32);
:func:`normalize` turns them into normalised floats on the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import logging
import os
import random
import select
import signal
import subprocess
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset import utils as wds_utils
from webdataset.gopen import Pipe, gopen, rewrite_url
from webdataset.tariterators import group_by_keys, tar_file_expander
from torchvision.transforms import v2

from .epochs import DEFAULT_OPEN_SHARDS, Geometry, Piece, Unit, block_units, epoch_units, interleaved, mix_seed
from .epochs import new_spec, shard_runs, shuffled, slice_pieces
from .epochs import epoch_batches_per_rank, epoch_geometry, reader_ranges  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call; they are still
# the fastest CPU JPEG path, so that one warning is silenced; PIL serves where they are missing.
warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
try:
    from torchvision.io import ImageReadMode, decode_jpeg as _decode_jpeg
    _RGB = ImageReadMode.RGB
except ImportError:  # pragma: no cover
    _decode_jpeg = None

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Independent RNG streams per worker, so e.g. changing the shuffle buffer does not change shard order.
_SHARD_STREAM, _SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1, 2
_WARN_EVERY_S = 10.0
# If this many samples/shards in a row fail, the data is broken rather than noisy: fail loudly instead of
# spinning forever on an endless stream that never yields a batch.
_MAX_CONSECUTIVE_SKIPS = 1000
# A remote shard (http, pipe:, ...) that sends no byte for `stall_timeout_s` is a failed shard. Each stall costs
# that long, so a few in a row (with no readable image between them) mean the source is down: fail the run after
# _MAX_CONSECUTIVE_STALLS x stall_timeout_s instead of after 1000 of them.
DEFAULT_STALL_TIMEOUT_S = 30.0
_MAX_CONSECUTIVE_STALLS = 3


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

def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# ----------------------------------------------------------------------------- epoch geometry (pure)

def shard_counts(pattern: str, manifest: str | None = None) -> list[int]:
    """Samples per shard, in the order of ``expand_shards(pattern)``, from manifest.json files.

    Local shards use the manifest beside them; ``manifest`` (a path) serves remote ones (pipe:, http, s3),
    matched by file name."""
    shards = expand_shards(pattern)
    tables: dict[str, dict[str, int]] = {}

    def table(path: str) -> dict[str, int]:
        if path not in tables:
            if not os.path.exists(path):
                raise ValueError(f"no manifest at {path}: per-shard sample counts are needed here; write shards with "
                                 "`dbot-shards`, or set data.manifest, or use data.resampled=true")
            with open(path) as f:
                tables[path] = {e["name"]: int(e["num_samples"]) for e in json.load(f)["shards"]}
        return tables[path]

    counts = []
    for url in shards:
        local = _local_path(url)
        name = os.path.basename(urlparse(url.split()[-1]).path if local is None else local)
        where = manifest or (os.path.join(os.path.dirname(os.path.abspath(local)), "manifest.json") if local else None)
        if where is None:
            raise ValueError(f"shard {url!r} is remote: give its manifest.json as data.manifest to count its samples")
        t = table(where)
        if name not in t:
            raise ValueError(f"{name} is not listed in {where}; regenerate the manifest or fix the pattern")
        counts.append(t[name])
    return counts


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


# --------------------------------------------------------------------------------------- remote streams

class ShardStalled(TimeoutError):
    """A remote shard sent no byte within the stall limit; its reader process was killed."""


class _StallLimitedPipe:
    """The stdout of a shard's reader process (curl for http(s), the shell of a `pipe:` command, ...) with a stall
    limit: `read` raises :class:`ShardStalled`, after killing the process, when no byte arrives for `stall_s`
    seconds. Only time spent waiting inside `read` counts, so a slow consumer never looks like a stalled server.
    Reads are short (at most `size` bytes of what has arrived), which tarfile's stream reader expects."""

    _CHUNK = 1 << 20    # bytes per os.read: tarfile asks for 10 KiB at a time; a poll per 10 KiB costs 40% speed

    def __init__(self, url: str, proc: subprocess.Popen, ok_status: Iterable[int], own_group: bool, stall_s: float,
                 pipe: Pipe | None = None):
        self.url, self.proc, self.ok_status = url, proc, set(ok_status)
        self.own_group, self.stall_s = own_group, stall_s
        # gopen's own wrapper, if it started the process: held so that its __del__, which closes the pipe and
        # then waits up to 2 h for the process, runs only after `close` has killed and reaped it.
        self.pipe = pipe
        self.fd = proc.stdout.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.eof = False
        self.buf, self.pos = b"", 0       # bytes read from the pipe and not yet returned: buf[pos:]

    def __repr__(self) -> str:           # webdataset puts the stream into its error messages
        return f"<shard stream {self.url}>"

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(functools.partial(self.read, 1 << 20), b""))
        if self.pos == len(self.buf):
            if self.eof or size == 0:
                return b""
            if not self.poller.poll(self.stall_s * 1000):
                self._stall("sent no bytes")
            self.buf, self.pos = os.read(self.fd, self._CHUNK), 0   # raw fd: a buffered read would wait, unwatched
            if not self.buf:
                self._end()
                return b""
        out = self.buf[self.pos:self.pos + size]
        self.pos += len(out)
        return out

    def _stall(self, what: str) -> None:
        self.close()
        raise ShardStalled(f"{self.url} {what} for {self.stall_s:g} s (data.stall_timeout_s); its reader was killed")

    def _end(self) -> None:
        """End of output: the process must exit soon, with a good status (curl -f reports HTTP errors as 22)."""
        self.eof = True
        try:
            status = self.proc.wait(timeout=self.stall_s)
        except subprocess.TimeoutExpired:
            self._stall("closed its output but did not exit")
        if status not in self.ok_status:
            raise OSError(f"{self.url}: reader exited with status {status}")

    def close(self) -> None:
        """Kill the reader unless it has exited (for `pipe:`, every process of the command), and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self.own_group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def _open_remote(url: str, stall_s: float):
    """A non-local shard opened as webdataset's gopen opens it, but read with a stall limit.

    A `pipe:` command starts in a session of its own, so that a stall kills the whole command (the shell and the
    `aws`/`curl`/... it started), not only the shell. Every other scheme webdataset knows (http(s) and sftp via
    curl, gs, ais, hf, ...) runs one reader process, which gopen starts; that process is watched and killed."""
    url = rewrite_url(url)
    if url.startswith("pipe:"):
        if wds_utils.enforce_security:
            raise ValueError("pipe: urls are disabled (WDS_SECURE is set)")
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        return _StallLimitedPipe(url, proc, (0, 141), True, stall_s)   # 141: the shell's SIGPIPE status
    stream = gopen(url, "rb")
    if isinstance(stream, Pipe):
        return _StallLimitedPipe(url, stream.proc, stream.ignore_status, False, stall_s, pipe=stream)
    return stream                        # a user-registered gopen handler's own stream object: read as it is


# ------------------------------------------------------------------------------- reading and decoding

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


class _Decoder:
    """Raw sample -> augmented uint8 [3, S, S], or None if unreadable: ColorJitter (if on) on the whole image as
    the reference applies it, then RandomResizedCrop, then the flip (crop and flip commute in distribution).

    Each image's augmentation is seeded by its own integer, so a stream can skip ahead (resume) without
    replaying the RNG, and the caller's global torch RNG is left as it was."""

    def __init__(self, img_size: int, augment: Augment = Augment()):
        augment = augment.check()
        steps = [v2.ColorJitter(*(augment.color_jitter,) * 3)] if augment.color_jitter else []
        steps.append(v2.RandomResizedCrop(img_size, scale=augment.crop_scale,
                                          interpolation=INTERPOLATIONS[augment.interpolation]))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.augment = v2.Compose(steps)
        # The smallest crop (min scale, aspect 3/4) spans sqrt(0.75 * scale) of the short side; decoding the
        # JPEG at no less than img_size / that keeps every crop at full output resolution.
        self.draft_side = int(img_size / (0.75 * augment.crop_scale[0]) ** 0.5) + 1

    def image_bytes(self, sample: dict, count: bool) -> bytes | None:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None and count:
            _skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has none of {IMAGE_KEYS}")
        return None if key is None else sample[key]

    def __call__(self, sample: dict, seed: int, count: bool = True, validate_only: bool = False):
        global _consecutive_skips, _consecutive_stalls
        data = self.image_bytes(sample, count)
        if data is None:
            return None
        try:
            img = _load_rgb(data, 1 if validate_only else self.draft_side)   # 1: smallest DCT scale, cheap
        except Exception as exn:  # PIL raises a zoo of types for bad data
            if count:
                _skip(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: {exn!r}"[:300])
            return None
        _consecutive_skips = _consecutive_stalls = 0
        if validate_only:
            return True
        # Crop and resize run on the uint8 tensor (torch's antialiased bicubic kernel: ~4x faster than PIL's
        # here). Only the CPU generator is seeded: torch.manual_seed would also touch every accelerator.
        rng = torch.default_generator
        outer = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self.augment(img).contiguous()
        finally:
            rng.set_state(outer)


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
                 block: list[Unit] | None = None):
        self.pattern, self.shards, self.counts, self.spec, self.block = pattern, shards, counts, spec, block
        self.micro_batch, self.seed, self.rank, self.world_size = micro_batch, seed, rank, world_size
        self.shuffle_buffer, self.start_batch, self.stall_s = shuffle_buffer, start_batch, stall_s
        self.open_shards = open_shards
        self.decode = _Decoder(img_size, augment)

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
        yield torch.stack([image for image, _ in batch]), batch[-1][1]


def _with_skip_counts(batches: Iterator[tuple[torch.Tensor, tuple]]) -> Iterator[tuple[torch.Tensor, BatchInfo]]:
    """Attach to each batch the samples this worker skipped since its previous batch: the counter lives in the
    worker process, and this is how the count reaches the trainer."""
    seen = _skipped
    for images, position in batches:
        yield images, BatchInfo(_skipped - seen, *position)
        seen = _skipped


# ------------------------------------------------------------------------------------------- loader

def build_train_loader(pattern: str, *, img_size: int, micro_batch: int, num_workers: int, seed: int,
                       rank: int, world_size: int, resampled: bool = True, shuffle_buffer: int = 1000,
                       augment: Augment = Augment(), start_batch: int = 0, manifest: str | None = None,
                       stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, spec: dict | None = None,
                       open_shards: int = DEFAULT_OPEN_SHARDS) -> torch.utils.data.DataLoader:
    """INFINITE iterable of (uint8 image batch [micro_batch, 3, img_size, img_size] (CPU, pinned if CUDA),
    BatchInfo: samples skipped as unreadable since the producing worker's previous batch, reader position).

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
                     spec=None if resampled else spec, block=block)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,  # batched inside the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        # The DataLoader draws worker base seeds from this generator instead of the caller's global RNG.
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
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
    return images.float().sub_(mean).div_(std).to(dtype)     # in place on the fresh float copy
