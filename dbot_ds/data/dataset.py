"""What `data.shards` names: the shard pattern, its size and where that size came from, resolved once at start.

`data.shards` may be
- a pattern (brace ranges, `::`-joined, `pipe:`, http): used as given;
- a folder with `manifest.json` (written by `dbot-shards`): its shards and counts;
- a folder of `.tar` shards without a manifest: read as shards; their samples are counted from the tar headers
  once (rank 0) and the counts cached in the run folder, never written into the user's folder. A shard the
  loader cannot read at all (garbage, empty) is left out of the pattern, with a warning naming it; a damaged
  (truncated) one counts the samples the loader can still read from it;
- with `data.synthetic_num > 0` (the demo preset), a folder that does not exist or is empty: generated there.
  Generation goes to a sibling folder first and is renamed into place when complete, so a killed run never
  leaves a half-written dataset that would later be read as real shards.
Nothing is ever written into an existing folder that holds files.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from dbot_ds.config import Config, ConfigError
from dbot_ds.distributed.groups import barrier

from .manifest import MANIFEST, _local_path, count_tar_samples, expand_shards, shard_counts, shard_pattern
from .shard_reader import _raw_samples
from .synthetic import write_synthetic_shards

COUNTS_FILE = "shard_counts.json"      # in the run folder: counts of manifest-less shards
_SHOWN_SKIPS = 10                      # skipped shards named one by one, in warnings and describe()


@dataclass(frozen=True)
class Dataset:
    """The resolved training data. `manifest` is the per-shard count table the loader reads (None: the
    `manifest.json` beside each local shard); `num_samples` is the epoch size the stage plan uses."""
    pattern: str
    num_shards: int
    num_samples: int
    source: str                      # where num_samples came from, for the start-up line
    manifest: str | None
    skipped: tuple[tuple[str, str], ...] = ()    # (shard, why) left out of `pattern`: unreadable as a tar

    def describe(self) -> str:
        """The start-up line; names skipped shards, since the epoch is smaller than the folder suggests."""
        line = f"data: {self.pattern}: {self.num_shards} shards, {self.num_samples} samples (count from {self.source})"
        if not self.skipped:
            return line
        shown = ", ".join(f"{os.path.basename(s)} ({why})" for s, why in self.skipped[:_SHOWN_SKIPS])
        more = f" and {len(self.skipped) - _SHOWN_SKIPS} more" if len(self.skipped) > _SHOWN_SKIPS else ""
        return f"{line}; skipped {len(self.skipped)} corrupt shard(s): {shown}{more}"


def resolve_dataset(cfg: Config, rank: int, run_dir: Path) -> Dataset:
    """Resolve `data.shards` into a Dataset; a collective (rank 0 generates or counts, the others wait)."""
    d = cfg.data
    if not d.shards:
        raise ConfigError("data.shards is empty: set it to a shard pattern (e.g. data.shards='/data/in1k/shard-"
                          "{000000..001281}.tar', quoted so the shell leaves the braces alone) or a folder of shards; "
                          "for the built-in demo run `dbot-pretrain --preset demo`")
    if _is_pattern(d.shards):
        return _sized(cfg, d.shards, rank, run_dir)
    folder = Path(d.shards)
    if not (folder / MANIFEST).exists() and _empty_or_missing(folder):
        if d.synthetic_num <= 0:
            raise ConfigError(f"data.shards={folder} {'is empty' if folder.exists() else 'does not exist'}; point it "
                              "at your shards, or make test shards with `dbot-shards synthetic --out DIR --num N`")
        if rank == 0:
            _generate(folder, cfg)
        barrier()
    if (folder / MANIFEST).exists():
        return _sized(cfg, shard_pattern(folder), rank, run_dir)
    tars = sorted(p.name for p in folder.glob("*.tar"))
    if not tars:
        raise ConfigError(f"data.shards={folder} is a folder without manifest.json and without .tar shards; point it "
                          "at webdataset shards (`dbot-shards folder --src DIR --out SHARDS` converts image folders)")
    return _sized(cfg, "::".join(str(folder / t) for t in tars), rank, run_dir)


def _is_pattern(shards: str) -> bool:
    return any(c in shards for c in "{}") or "::" in shards or shards.endswith(".tar") or _local_path(shards) is None


def _empty_or_missing(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def _generate(folder: Path, cfg: Config, num: int | None = None, seed: int | None = None, what: str = "data") -> None:
    """Write the synthetic dataset beside `folder`, then rename it into place (atomic on one filesystem)."""
    num = cfg.data.synthetic_num if num is None else num
    for stale in folder.parent.glob(f"{folder.name}.partial-*"):    # our own leftovers from a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    print(f"[dbot] generating {num} synthetic images into {folder} ({what}.synthetic_num)", flush=True)
    write_synthetic_shards(tmp, num, img_size=max(64, cfg.model.img_size),
                           seed=cfg.run.seed if seed is None else seed)
    if folder.exists():
        folder.rmdir()                    # empty (checked by the caller); rename cannot replace it portably
    os.replace(tmp, folder)


# Seed offset of a generated evaluation set, so its images differ from the generated training images.
_EVAL_SEED = 1_000_003


def resolve_eval_shards(cfg: Config, rank: int) -> tuple[str, str]:
    """(bank pattern, query pattern or "") of eval.shards / eval.query_shards, each a pattern or a folder of shards.
    An empty or missing eval.shards folder is filled with eval.synthetic_num labelled synthetic images first (the
    demo's kNN set; never into a folder that holds anything). A collective."""
    e = cfg.eval
    bank = _eval_pattern(e.shards, "eval.shards", e.synthetic_num, cfg, rank)
    return bank, _eval_pattern(e.query_shards, "eval.query_shards", 0, cfg, rank) if e.query_shards else ""


def _eval_pattern(shards: str, key: str, synthetic_num: int, cfg: Config, rank: int) -> str:
    if _is_pattern(shards):
        return shards
    folder = Path(shards)
    if not (folder / MANIFEST).exists() and _empty_or_missing(folder):
        if synthetic_num <= 0:
            raise ConfigError(f"{key}={folder} {'is empty' if folder.exists() else 'does not exist'}; point it "
                              "at labelled shards (a cls key), e.g. written by `dbot-shards imagenet`")
        if rank == 0:
            _generate(folder, cfg, synthetic_num, cfg.run.seed + _EVAL_SEED, "eval")
        barrier()
    if (folder / MANIFEST).exists():
        return shard_pattern(folder)
    tars = sorted(p.name for p in folder.glob("*.tar"))
    if not tars:
        raise ConfigError(f"{key}={folder} holds no .tar shards; point it at labelled webdataset shards")
    return "::".join(str(folder / t) for t in tars)


def _sized(cfg: Config, pattern: str, rank: int, run_dir: Path) -> Dataset:
    """Attach the sample count: data.num_samples (resampled only), a manifest, or counted tar headers."""
    try:
        shards = expand_shards(pattern)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    d = cfg.data
    if d.num_samples and d.resampled:
        return Dataset(pattern, len(shards), d.num_samples, "data.num_samples", d.manifest or None)
    manifest, skipped = d.manifest or None, ()
    if manifest is None and _without_manifest(shards):
        manifest = str(run_dir / COUNTS_FILE)
        if rank == 0:
            _count_into(shards, Path(manifest))
        barrier()
        shards, skipped = _kept_shards(shards, Path(manifest))
        pattern = "::".join(shards) if skipped else pattern
        source = f"tar headers, cached in {manifest}"
    else:
        source = f"data.manifest {manifest}" if manifest else "manifest.json beside the shards"
    try:
        total = sum(shard_counts(pattern, manifest))
    except ValueError as e:
        raise ConfigError(f"{e}; or set data.num_samples (with data.resampled=true)") from e
    if d.num_samples and d.num_samples != total:
        raise ConfigError(f"data.num_samples={d.num_samples} but the shards hold {total} samples (from {source}), and "
                          "exact epochs (data.resampled=false) read every sample once: set data.num_samples=0 to "
                          "take the shards' own count, or data.resampled=true to keep data.num_samples as the epoch "
                          "size")
    return Dataset(pattern, len(shards), total, source, manifest, skipped)


def _without_manifest(shards: list[str]) -> bool:
    """All shards are local and no manifest.json lies beside any of them."""
    paths = [_local_path(s) for s in shards]
    return all(p is not None for p in paths) and not any(
        os.path.exists(os.path.join(os.path.dirname(os.path.abspath(p)), MANIFEST)) for p in paths)


def _count_into(shards: list[str], out: Path) -> None:
    """Count each shard's samples (reusing a cached count while its size and mtime are unchanged) and write
    them to `out` in manifest format, keyed by file name as `shard_counts` looks them up. Shards the loader
    cannot read are listed under "skipped" instead (with why), so that every rank leaves them out alike."""
    cached = json.loads(out.read_text()).get("files", {}) if out.exists() else {}
    entries, files, skipped, start = [], {}, [], time.monotonic()
    for i, url in enumerate(shards):
        path = _local_path(url)
        st = os.stat(path)
        key, stamp = os.path.abspath(path), [st.st_size, st.st_mtime_ns]
        hit = cached.get(key)
        n, problem = (hit["num_samples"], None) if hit and hit["stamp"] == stamp else _count_shard(url)
        if n == 0 and problem:
            skipped.append({"url": url, "reason": problem})
            continue
        if problem:
            print(f"[dbot] shard {path} is damaged ({problem}): counted the {n} samples the loader can read "
                  "from it", flush=True)
        else:             # only clean shards are cached: a damaged one is looked at again on the next start
            files[key] = {"stamp": stamp, "num_samples": n}
        entries.append({"name": os.path.basename(path), "num_samples": n})
        if time.monotonic() - start > 10 and i % 100 == 0:
            print(f"[dbot] counting samples: {i + 1}/{len(shards)} shards", flush=True)
    _warn_skipped(skipped, len(shards))
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError("shards from different folders share file names; write a manifest for them with "
                          "`dbot-shards manifest DIR` or set data.manifest")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"num_samples": sum(e["num_samples"] for e in entries), "shards": entries,
                               "files": files, "skipped": skipped}))
    os.replace(tmp, out)


def _count_shard(url: str) -> tuple[int, str | None]:
    """(samples, None) from the tar headers, which is fast (seeks over the data); if those cannot be read,
    (samples, why) where the samples are those the loader's own reader (`shard_reader._raw_samples`, which skips
    what it cannot read) gets from the file: 0 for garbage or an empty file, the intact samples before the
    cut of a truncated tar. So the epoch size the stage plan uses is what training will actually read."""
    try:
        return count_tar_samples(_local_path(url)), None
    except Exception as e:  # noqa: BLE001 - tarfile raises ReadError, OSError, ValueError ... for bad files
        problem = f"{'tarfile' if isinstance(e, tarfile.TarError) else type(e).__name__}: {e}"
    return sum(1 for _ in _raw_samples(url, count=False)), problem


def _warn_skipped(skipped: list[dict], total: int) -> None:
    """Name each skipped shard on stdout (the first few, if many): the epoch is smaller than the folder."""
    if not skipped or len(skipped) == total:
        return                                     # none skipped, or none left: `_kept_shards` raises
    for s in skipped[:_SHOWN_SKIPS]:
        print(f"[dbot] skipped corrupt shard {_local_path(s['url'])} ({s['reason']}): "
              f"{total - len(skipped)} of {total} shards used", flush=True)
    if len(skipped) > _SHOWN_SKIPS:
        print(f"[dbot] ... and {len(skipped) - _SHOWN_SKIPS} more corrupt shards skipped", flush=True)


def _kept_shards(shards: list[str], counts: Path) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """(shards to read, (shard, why) skipped), from the verdict rank 0 wrote to `counts`, so all ranks agree.
    A ConfigError on every rank when no shard is readable, naming the folder and the first file's error."""
    bad = {s["url"]: s["reason"] for s in json.loads(counts.read_text()).get("skipped", [])}
    kept = [s for s in shards if s not in bad]
    if not kept:
        first = _local_path(shards[0])
        raise ConfigError(f"no readable shard in {os.path.dirname(os.path.abspath(first))}: all {len(shards)} "
                          f".tar files fail to read as tar archives, e.g. {first}: {bad[shards[0]]}; "
                          "point data.shards at webdataset shards")
    return kept, tuple((s, bad[s]) for s in shards if s in bad)
