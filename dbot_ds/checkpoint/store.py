"""Checkpoints: DeepSpeed's engine state + the teacher's weights + our client state, marked complete last.

Layout of `<run>/checkpoints/`:
  step00001200/            DeepSpeed files (model/optimizer shards), teacher.pt, COMPLETE (written last)
  latest                   the tag of the newest complete checkpoint (atomic rename; written after COMPLETE)
A crash mid-save leaves a tag folder without COMPLETE; `find_resume_tag` never picks it.

COMPLETE also lists every file's size and SHA-256 (`files`). Nothing of a tag reaches DeepSpeed before
`verify` has checked those and read every file with torch's weights-only unpickler (see checkpoint/safety.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dbot_ds.distributed.groups import barrier, gather_objects

from .safety import (
    CheckpointRefused,
    HashingWriter,
    check_share,
    load_teacher_file,
    no_record_warning,
    record_files,
    refusal,
)
from .storage import folder_bytes

TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, teacher, ckpt_dir: Path, step: int, state: dict, stage_end: bool, keep_last: int) -> str:
    """Save on all ranks (a collective); returns the tag. `state` is the trainer's client state (stage, step,
    samples seen, data seed, config). `latest` moves only once every piece is on disk."""
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"dbot": state}, save_latest=False)
    # A teacher from other weights never changes: it is reloaded from teacher.weights, not stored each time.
    bootstrapped = teacher.cfg.teacher.source == "bootstrap"
    teacher_state = teacher.full_state() if bootstrapped else None     # collective under the zero3 placement
    hashed = {}
    if rank == 0 and bootstrapped:
        blob = {"depth": teacher.depth, "state": teacher_state}
        hashed["teacher.pt"] = _save_hashed(blob, ckpt_dir / tag / "teacher.pt")
    barrier()                                     # every rank's DeepSpeed shards are written
    files = _record_together(ckpt_dir / tag, rank, world, hashed)
    if rank == 0:
        meta = {"step": step, "stage": state["stage"], "stage_end": stage_end, "time": time.time(),
                "client_state": state, "files": files}
        _atomic_write(ckpt_dir / tag / "COMPLETE", json.dumps(meta))
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    barrier()
    return tag


def _save_hashed(obj, path: Path) -> dict:
    """torch.save through a hashing writer (no second read of the file); returns its COMPLETE entry."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
    os.replace(tmp, path)
    return writer.record()


def _record_together(tag_dir: Path, rank: int, world: int, hashed: dict) -> dict[str, dict]:
    """Collective: each rank hashes the files it wrote (its optimizer shard is still in its page cache; rank 0
    the model states), and all records are merged. A rank that cannot read fails every rank, none hangs."""
    try:
        mine, error = record_files(tag_dir, rank, world, known=hashed), None
    except OSError as e:
        mine, error = {}, e
    gathered = gather_objects((mine, str(error) if error else None))
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(gathered) if e]
    if errors:
        raise error or OSError(f"hashing {tag_dir} failed on {'; '.join(errors)}")
    return dict(sorted(kv for files, _ in gathered for kv in files.items()))


def next_checkpoint_bytes(ckpt_dir: Path, student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Bytes the next checkpoint needs: the size of the newest one, or before the first an estimate of bf16
    weights + fp32 master + two fp32 Adam moments (14 bytes a parameter) plus the bf16 teacher."""
    last = find_resume_tag(ckpt_dir)
    if last:
        return folder_bytes(ckpt_dir / last)

    def numel(module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return 14 * numel(student) + 2 * numel(teacher)


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for d in ckpt_dir.iterdir():
        m = TAG_RE.match(d.name)
        if m and (d / "COMPLETE").exists():
            out.append((int(m.group(1)), d.name))
    return sorted(out)


def find_resume_tag(ckpt_dir: Path) -> str | None:
    """The tag named by `latest` if complete, else the newest complete one, else None."""
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / "COMPLETE").exists():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete periodic checkpoints beyond the newest `keep_last`; stage-end checkpoints are kept."""
    periodic = []
    for _, tag in complete_tags(ckpt_dir):
        meta = json.loads((ckpt_dir / tag / "COMPLETE").read_text())
        if not meta.get("stage_end"):
            periodic.append(tag)
    # Renamed out of the tag namespace first (atomic), then deleted: a kill during the rmtree can neither leave a
    # tag whose COMPLETE survives its files nor an old folder nothing removes; the next prune finishes the job.
    for tag in periodic[:-keep_last] if keep_last > 0 else []:
        for name in (tag, tag + ".universal"):                   # and its cached universal copy (reshard.py)
            if (ckpt_dir / name).exists():
                os.replace(ckpt_dir / name, ckpt_dir / f".pruned-{name}")
    for trash in ckpt_dir.glob(".pruned-step*"):
        shutil.rmtree(trash, ignore_errors=True)


_VERIFIED: set[Path] = set()      # tag folders this process has verified (so load() need not do it twice)


def verify(ckpt_dir: Path, tag: str, trust: bool = False) -> None:
    """Collective, before anything of the tag is unpickled: every file has its recorded size and SHA-256 and
    (unless `trust`) passes the weights-only scan. Each rank checks the files it owns (safety.owner) in a
    thread pool; the verdicts are gathered, so every rank raises the same CheckpointRefused or none does."""
    tag_dir = ckpt_dir / tag
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    files = read_meta(ckpt_dir, tag).get("files")
    if files is None and rank == 0:
        print(no_record_warning(tag_dir), file=sys.stderr, flush=True)
    problems = sorted(p for share in gather_objects(check_share(tag_dir, files, rank, world, scan=not trust)) for p in share)
    if problems:
        raise CheckpointRefused(refusal(tag_dir, problems))
    _VERIFIED.add(tag_dir.resolve())


def load(engine, ckpt_dir: Path, tag: str, trust: bool = False) -> tuple[dict, dict]:
    """Restore the engine (weights, optimizer) from `tag`; returns (client_state, teacher {'depth', 'state'}).
    The tag is verified first unless this process already did (the trainer does, before building the engine)."""
    if (ckpt_dir / tag).resolve() not in _VERIFIED:
        verify(ckpt_dir, tag, trust)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    path = ckpt_dir / tag / "teacher.pt"
    teacher = load_teacher_file(path, trust) if path.exists() else None
    return client, teacher


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    """The COMPLETE record (step, stage, client state incl. config) without building an engine, so a resume
    is validated before any GPU time is spent."""
    return json.loads((ckpt_dir / tag / "COMPLETE").read_text())
