"""`dbot-shards imagenet` / `dbot-shards folder`: real images -> shuffled WebDataset shards, resumable.

    dbot-shards imagenet --src ILSVRC2012_img_train.tar --out data/in1k   # or --src train/ (class folders)
    dbot-shards imagenet --src val/ --labels LOC_val_solution.csv --synsets data/in1k/synsets.txt --out data/val
    dbot-shards folder --src photos/ --out data/photos

Pipeline: *scan* the source into an index of :class:`Item` (where each image's bytes are; no image is read),
*plan* (sort, shuffle with ``seed``, cut into shards of ``per_shard``), then *write* shards in parallel
worker processes. A sample is ``{"__key__": "%09d" (position in the shuffled plan), "jpg"|"png"|"webp":
the original file bytes, "json": {"file": ...[, "synset": ...]}[, "cls": class index]}``. The subcommands'
argument parsing lives with the rest of the CLI in shards.py.

Resume: ``plan.json`` holds a fingerprint of the plan; each finished shard is renamed from ``*.tar.tmp``
and then appended to ``progress.jsonl``. A re-run with the same plan skips shards listed there whose file
still has the recorded size; a different plan in the same directory is refused.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import posixpath
import random
import tarfile
from pathlib import Path
from typing import NamedTuple

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .manifest import SHARD_NAME, write_manifest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Sample key per PIL format: the loader (dbot_ds.data.augment.IMAGE_KEYS) accepts exactly these.
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PLAN, PROGRESS, SKIPPED, SYNSETS = "plan.json", "progress.jsonl", "skipped.txt", "synsets.txt"


class ShardWriterError(Exception):
    """A problem with the inputs or the output directory, reported to the user without a traceback."""


class Item(NamedTuple):
    """One source image: ``size`` bytes at byte ``offset`` of ``path`` (the image file itself with offset 0,
    or an uncompressed tar that holds it)."""
    name: str           # relative path (ImageNet: file name), recorded in the sample's json
    synset: str | None  # ImageNet class (WordNet id); None when unlabeled
    path: str
    offset: int
    size: int


# ------------------------------------------------------------------------------------------------ scan

def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    # Dot files include macOS "._x.jpg" resource forks, which are not images.
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def scan_dir(root: str | Path) -> list[Item]:
    """Image files under ``root`` (recursive). ``synset`` is the holding folder's name, None at the top."""
    root = Path(root)
    items = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        synset = None if Path(folder) == root else Path(folder).name
        for f in sorted(files):
            path = Path(folder, f)
            if _is_image_name(f) and path.is_file():
                items.append(Item(path.relative_to(root).as_posix(), synset, str(path), 0, path.stat().st_size))
    return items


def scan_tar(path: str | Path) -> list[Item]:
    """Images in an uncompressed tar, found from headers only (no image data is read). Members that are
    tars themselves (``ILSVRC2012_img_train.tar`` holds ``n01440764.tar``, ...) are scanned one level deep,
    with the inner tar's stem as ``synset``; other images get their holding folder's name, None at the top.
    """
    path, items = str(path), []  # one shared path string for all items: ImageNet has 1.28M of them
    try:
        outer = tarfile.open(path, "r:")  # "r:": only an uncompressed tar has seekable image offsets
    except tarfile.ReadError as exn:
        raise ShardWriterError(f"{path} is not an uncompressed tar ({exn})") from exn
    with outer:
        for member in outer.getmembers():
            if not member.isfile():
                continue
            if member.name.lower().endswith(".tar"):
                synset = posixpath.splitext(posixpath.basename(member.name))[0]
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    # Inner offsets count from the inner tar's first byte, i.e. from the outer member's data.
                    items += [Item(posixpath.normpath(m.name), synset, path, member.offset_data + m.offset_data,
                                   m.size) for m in inner.getmembers() if m.isfile() and _is_image_name(m.name)]
            elif _is_image_name(member.name):
                name = posixpath.normpath(member.name)
                folder = posixpath.basename(posixpath.dirname(name)) or None
                items.append(Item(name, folder, path, member.offset_data, member.size))
    return items


def scan(src: str | Path) -> list[Item]:
    """:func:`scan_dir` or :func:`scan_tar`, by what ``src`` is."""
    src = Path(src)
    if src.is_dir():
        return scan_dir(src)
    if src.is_file():
        return scan_tar(src)
    raise ShardWriterError(f"--src {src} does not exist")


def read_labels(path: str | Path) -> dict[str, str]:
    """File stem -> synset, from lines ``ILSVRC2012_val_00000001.JPEG n01751748`` or the Kaggle
    ``LOC_val_solution.csv`` (``ImageId,PredictionString`` rows whose first token is the synset)."""
    labels = {}
    for line in Path(path).read_text().splitlines():
        tokens = line.replace(",", " ").split()
        if len(tokens) >= 2 and tokens[0] != "ImageId":  # skip the CSV header
            labels[posixpath.splitext(tokens[0])[0]] = tokens[1]
    if not labels:
        raise ShardWriterError(f"no 'file synset' lines in labels file {path}")
    return labels


def index_imagenet(src: str | Path, labels: str | Path | None = None,
                   synsets: str | Path | None = None) -> tuple[list[Item], list[str]]:
    """(images, sorted synset list) of an ImageNet split: class folders, the train tar of per-class tars,
    or (with ``labels``) a flat folder/tar. ``synsets`` (a ``synsets.txt``) fixes the class list, e.g. to
    give val the same class indices as train; by default it is the sorted synsets found."""
    # The json records the file name only, so the class-folder and tar layouts give identical samples.
    items = [item._replace(name=posixpath.basename(item.name)) for item in scan(src)]
    if labels is not None:
        by_stem = read_labels(labels)
        unlabeled = [i.name for i in items if posixpath.splitext(i.name)[0] not in by_stem]
        if unlabeled:
            raise ShardWriterError(f"{len(unlabeled)} images in {src} have no label in {labels}, "
                                   f"e.g. {unlabeled[:3]}")
        items = [i._replace(synset=by_stem[posixpath.splitext(i.name)[0]]) for i in items]
    unlabeled = [i.name for i in items if i.synset is None]
    if unlabeled:
        raise ShardWriterError(f"{len(unlabeled)} images in {src} are not in a class folder (e.g. {unlabeled[:3]});"
                               " use the class-folder layout (train/n01440764/*.JPEG) or pass --labels FILE")
    if not items:
        raise ShardWriterError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {src}")
    found = sorted({i.synset for i in items})
    if synsets is None:
        return items, found
    classes = Path(synsets).read_text().split()
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ShardWriterError(f"{len(unknown)} synsets of {src} are not in {synsets}, e.g. {unknown[:3]}")
    return items, classes


def index_folder(src: str | Path) -> list[Item]:
    """Unlabeled images under ``src`` (recursive), named by their path relative to ``src``."""
    items = [item._replace(synset=None) for item in scan(src)]
    if not items:
        raise ShardWriterError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found in {src}")
    return items


# ------------------------------------------------------------------------------------------------ plan

def plan_shards(items: list[Item], per_shard: int, seed: int) -> list[list[Item]]:
    """Items in a canonical order, globally shuffled by ``seed``, cut into shards of ``per_shard``.

    Sorting first makes the plan independent of scan order (e.g. tar member order vs. folder listing).
    """
    if per_shard < 1:
        raise ShardWriterError(f"--per-shard must be >= 1, got {per_shard}")
    order = sorted(items, key=lambda i: (i.synset or "", i.name, i.path, i.offset))
    random.Random(seed).shuffle(order)
    return [order[start:start + per_shard] for start in range(0, len(order), per_shard)]


def plan_fingerprint(shards: list[list[Item]], classes: list[str]) -> str:
    """sha256 over the class list and every shard's (name, synset, size) in order: it changes with the
    per-shard count, seed, classes and the source files, but not with the source's location or layout."""
    h = hashlib.sha256("\n".join(classes).encode() + b"\0")
    for shard in shards:
        h.update(b"\0shard\0")
        for item in shard:
            h.update(f"{item.name}\0{item.synset}\0{item.size}\n".encode())
    return h.hexdigest()


def _check_plan(out_dir: Path, plan: dict) -> None:
    """Write ``plan.json`` into a fresh ``out_dir``, or refuse one that holds shards of another plan."""
    path = out_dir / PLAN
    if not path.exists():
        if any(out_dir.glob("shard-*.tar")):
            raise ShardWriterError(f"{out_dir} already holds shards that are not from this command (no {PLAN});"
                                   " use an empty --out directory")
        _write_atomic(path, json.dumps(plan, indent=1) + "\n")
        return
    old = json.loads(path.read_text())
    if old.get("fingerprint") == plan["fingerprint"]:
        return
    changed = [f"{k}: {old.get(k)!r} on disk vs {plan[k]!r} now" for k in ("kind", "per_shard", "seed",
               "num_planned", "num_classes") if old.get(k) != plan[k]]
    raise ShardWriterError(
        f"{out_dir} holds shards of a different plan ({'; '.join(changed) or 'the source files differ'}). "
        "Mixing them would duplicate or drop samples: re-run with the original arguments, or use a new --out.")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _done_shards(out_dir: Path) -> dict[str, dict]:
    """Shard name -> its progress record, for shards that are complete on disk."""
    records = {}
    if (out_dir / PROGRESS).exists():
        for line in (out_dir / PROGRESS).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: that shard is simply redone
                continue
            records[record["name"]] = record  # the latest record of a rewritten shard wins
    # The size check catches a shard replaced or truncated after it was recorded.
    return {name: r for name, r in records.items()
            if (out_dir / name).is_file() and (out_dir / name).stat().st_size == r["bytes"]}


# ----------------------------------------------------------------------------------------------- write

def read_item(item: Item) -> bytes:
    """The item's ``size`` bytes, by seek + read (no tar parsing: the offsets come from the scan)."""
    with open(item.path, "rb") as f:
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise OSError(f"short read: {len(data)} of {item.size} bytes")
    return data


def image_key(data: bytes) -> str:
    """Sample key ("jpg", "png" or "webp") for the image in ``data``; raises for anything unreadable.

    Decodes the whole image, since headers alone miss truncation; JPEGs at 1/8 scale (~1 ms per 100 KB).
    """
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message holds an object address: not reproducible in skipped.txt
        raise ValueError("not a recognised image format") from None
    with img:
        key = FORMAT_KEYS.get(img.format)
        if key is None:
            raise ValueError(f"unsupported format {img.format}")
        img.draft(None, (1, 1))  # JPEG only: the smallest DCT scale, still entropy-decoding every byte
        img.load()
    return key


def write_shard(out_dir: Path, index: int, items: list[Item], first_key: int, classes: list[str]) -> dict:
    """Write shard ``index`` (samples keyed ``first_key``, ``first_key + 1``, ...) via a temporary file and
    return its progress record: name, num_samples, bytes (file size) and skipped ([name, reason] pairs).

    Unreadable images are skipped here rather than at scan time, which would read the whole dataset twice.
    The plan is fixed before that, so a re-run still gives the same shards.
    """
    name = SHARD_NAME.format(index)
    class_index = {synset: i for i, synset in enumerate(classes)}
    tmp = out_dir / (name + ".tmp")
    num_samples, skipped = 0, []
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=0) as sink:  # fixed mtime: a rewritten shard is byte-identical
            for key, item in enumerate(items, first_key):
                try:
                    data = read_item(item)
                    sample = {"__key__": f"{key:09d}", image_key(data): data}
                except Exception as exn:  # PIL raises a zoo of types for bad data
                    skipped.append([item.name, f"{type(exn).__name__}: {exn}"[:200]])
                    continue
                meta = {"file": item.name}
                if item.synset is not None:
                    meta["synset"] = item.synset
                    sample["cls"] = str(class_index[item.synset]).encode()
                sample["json"] = json.dumps(meta).encode()
                sink.write(sample)
                num_samples += 1
        f.flush()
        os.fsync(f.fileno())  # the rename below must not expose a shard whose data is not on disk
    os.replace(tmp, out_dir / name)
    return {"name": name, "num_samples": num_samples, "bytes": (out_dir / name).stat().st_size,
            "skipped": skipped}


def _write_shard_task(task: tuple) -> dict:
    return write_shard(*task)


def _run_tasks(tasks: list[tuple], workers: int):
    """Yield :func:`write_shard` records as shards finish, from ``workers`` processes each writing whole
    shards; workers=1 runs in this process (no fork, easy to debug)."""
    if workers <= 1:
        yield from map(_write_shard_task, tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap_unordered(_write_shard_task, tasks)


def write_shards(shards: list[list[Item]], out_dir: str | Path, *, kind: str, seed: int, per_shard: int,
                 classes: list[str] | None = None, workers: int | None = None, source: str = "") -> dict:
    """Write the planned ``shards`` into ``out_dir`` (resuming a previous run of the same plan) and return
    a summary: manifest, written, reused (shards already complete), skipped ([name, reason] pairs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = classes or []
    plan = {"kind": kind, "per_shard": per_shard, "seed": seed, "num_planned": sum(map(len, shards)),
            "num_shards": len(shards), "num_classes": len(classes), "source": source,
            "fingerprint": plan_fingerprint(shards, classes)}
    _check_plan(out_dir, plan)
    for stale in out_dir.glob("shard-*.tar.tmp"):  # from an interrupted run
        stale.unlink()
    if classes:
        _write_atomic(out_dir / SYNSETS, "\n".join(classes) + "\n")

    done = _done_shards(out_dir)
    first_keys = list(itertools.accumulate(map(len, shards), initial=0))  # key = position in the plan
    tasks = [(out_dir, i, shard, first_keys[i], classes) for i, shard in enumerate(shards)
             if SHARD_NAME.format(i) not in done]
    records = dict(done)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    with open(out_dir / PROGRESS, "a") as progress, \
            tqdm(total=len(shards), initial=len(done), unit="shard", desc="shards") as bar:
        bar.set_postfix(samples=sum(r["num_samples"] for r in done.values()))
        for record in _run_tasks(tasks, workers):
            # Recorded only after the shard's rename: a crash in between just redoes that shard.
            progress.write(json.dumps(record) + "\n")
            progress.flush()
            records[record["name"]] = record
            bar.update()
            bar.set_postfix(samples=sum(r["num_samples"] for r in records.values()))

    ordered = [records[SHARD_NAME.format(i)] for i in range(len(shards))]
    skipped = [pair for r in ordered for pair in r["skipped"]]
    (out_dir / SKIPPED).write_text("".join(f"{name}\t{reason}\n" for name, reason in skipped))
    manifest = write_manifest(out_dir, [r["num_samples"] for r in ordered],
                              extra={k: plan[k] for k in ("kind", "source", "seed", "per_shard", "num_classes",
                                                          "fingerprint")} | {"num_skipped_files": len(skipped)})
    return {"manifest": manifest, "written": len(tasks), "reused": len(done), "skipped": skipped}

