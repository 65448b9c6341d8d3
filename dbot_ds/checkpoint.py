"""Checkpoints: DeepSpeed's engine state + the teacher's weights + our client state, marked complete last.

Layout of `<run>/checkpoints/`:
  step00001200/            DeepSpeed files (model/optimizer shards), teacher.pt, COMPLETE (written last)
  latest                   the tag of the newest complete checkpoint (atomic rename; written after COMPLETE)
A crash mid-save leaves a tag folder without COMPLETE; `find_resume_tag` never picks it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import barrier

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
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"dbot": state}, save_latest=False)
    # A teacher from other weights never changes: it is reloaded from teacher.weights, not stored each time.
    bootstrapped = teacher.cfg.teacher.source == "bootstrap"
    teacher_state = teacher.full_state() if bootstrapped else None     # collective under the zero3 placement
    if rank == 0 and bootstrapped:
        tmp = ckpt_dir / tag / "teacher.pt.tmp"
        torch.save({"depth": teacher.depth, "state": teacher_state}, tmp)
        os.replace(tmp, ckpt_dir / tag / "teacher.pt")
    barrier()                                     # every rank's DeepSpeed shards are written
    if rank == 0:
        meta = {"step": step, "stage": state["stage"], "stage_end": stage_end, "time": time.time(),
                "client_state": state}
        _atomic_write(ckpt_dir / tag / "COMPLETE", json.dumps(meta))
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    barrier()
    return tag


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
    for tag in periodic[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict, dict]:
    """Restore the engine (weights, optimizer) from `tag`; returns (client_state, teacher {'depth', 'state'})."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    path = ckpt_dir / tag / "teacher.pt"
    teacher = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    return client, teacher


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    """The COMPLETE record (step, stage, client state incl. config) without building an engine, so a resume
    is validated before any GPU time is spent."""
    return json.loads((ckpt_dir / tag / "COMPLETE").read_text())
