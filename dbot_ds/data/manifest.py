"""The on-disk layout that every shard writer and the loader share: shard file names (`SHARD_NAME`), `manifest.json`
(written by :func:`write_manifest` / :func:`write_manifest_for`, read by :func:`dataset_size`, :func:`shard_counts`
and :func:`shard_pattern`) and shard patterns (:func:`expand_shards`).

Separate so that the writers (synthetic.py, digits.py, shard_writer.py), the `dbot-shards` CLI (shards.py) and the
loader all build on one module below them, instead of on each other: it imports nothing else from dbot_ds.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

SHARD_NAME = "shard-{:06d}.tar"
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------- writing

def write_manifest(out_dir: Path, counts: list[int], extra: dict | None = None) -> dict:
    """Write ``manifest.json`` for shards 0..len(counts)-1 holding ``counts`` samples; ``extra`` keys
    (provenance such as seed or source) are appended after the ones the loader reads."""
    manifest = {"num_samples": sum(counts),
                "shards": [{"name": SHARD_NAME.format(i), "num_samples": n} for i, n in enumerate(counts)],
                **(extra or {})}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def count_tar_samples(path: str | Path) -> int:
    """Samples in one webdataset tar, as the loader groups them: consecutive members sharing a key (the name up to
    the first dot of the file name). Reads only the 512-byte headers and seeks over the data, so counting
    ImageNet's 1.28 M images takes seconds to minutes, not a full read."""
    samples, key = 0, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            head, name = os.path.split(member.name)
            if "." not in name or name.startswith("."):
                continue                         # webdataset skips names without an extension
            k = os.path.join(head, name.split(".", 1)[0])
            if k != key:
                samples, key = samples + 1, k
    return samples


def write_manifest_for(folder: str | Path) -> dict:
    """manifest.json for the existing ``*.tar`` shards of ``folder`` (any names), counted from tar headers."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise SystemExit(f"dbot-shards manifest: no .tar files in {folder}")
    manifest = {"num_samples": 0, "shards": [{"name": t.name, "num_samples": count_tar_samples(t)} for t in tars]}
    manifest["num_samples"] = sum(e["num_samples"] for e in manifest["shards"])
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------- reading

def shard_pattern(out_dir: str | Path) -> str:
    """Shard pattern for a directory written by `dbot-shards` (from its manifest), e.g.
    ``DIR/shard-{000000..000007}.tar``; falls back to '::'-joined paths for non-consecutive names."""
    out_dir = Path(out_dir)
    names = [e["name"] for e in json.loads((out_dir / MANIFEST).read_text())["shards"]]
    if names == [SHARD_NAME.format(i) for i in range(len(names))]:
        if len(names) == 1:
            return str(out_dir / names[0])
        return str(out_dir / f"shard-{{000000..{len(names) - 1:06d}}}.tar")
    return "::".join(str(out_dir / n) for n in names)


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
