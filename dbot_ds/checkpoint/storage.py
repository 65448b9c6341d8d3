"""Run-folder trouble (read-only, full, over quota) as one clear line on every rank, instead of a traceback
on one rank and a hang on the others.

Every check here is collective: each rank tries, the verdicts are gathered, and all ranks raise together.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch.distributed as dist

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StorageError(OSError):
    """The run folder cannot be written; the message names the folder, the cause and the fix. Exit code 2."""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def explain(e: OSError, folder: Path, need_bytes: int | None = None) -> str:
    """One line for an OSError met while writing into `folder`."""
    if e.errno in _FULL:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        need = f" it needs about {gib(need_bytes)}," if need_bytes else ""
        return (f"no space left in {folder} ({e.strerror}):{need} {gib(free)} free. Free some space, lower "
                "run.keep_last, or set run.out_dir to a bigger disk")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"{folder} is not writable ({e.strerror}). Make it writable or set run.out_dir to a folder this user "
                "can write")
    return f"cannot write to {folder}: {e}. Check the filesystem, or set run.out_dir to another folder"


def raise_together(message: str | None) -> None:
    """Collective: if any rank has a message, every rank raises a StorageError (with the first rank's message)."""
    messages = [message]
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if failed:
        rank, msg = failed[0]
        raise StorageError(msg if len(messages) == 1 else f"rank {rank}: {msg}")


def probe_writable(folder: Path, need_bytes: int = 0) -> str | None:
    """Create `folder`, write and remove a small file in it, and check the free space; a message or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        return explain(e, folder, need_bytes or None)
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes:
        return (f"no space left in {folder} for the next checkpoint: it needs about {gib(need_bytes)}, "
                f"{gib(free)} free. Free some space, lower run.keep_last, or set run.out_dir to a bigger disk")
    return None


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
