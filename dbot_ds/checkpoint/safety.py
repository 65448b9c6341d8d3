"""A checkpoint never runs code: every file of a tag folder is read by torch's weights-only unpickler, with exactly
the globals DeepSpeed's own checkpoints hold, before DeepSpeed (or `zero_to_fp32`) unpickles it in full; and
every file still has the size and SHA-256 recorded in COMPLETE when it was saved.

Why a scan first: DeepSpeed 0.19.8 loads its model and optimizer files with `torch.load(weights_only=False)`
(`TorchCheckpointEngine.load`, `zero_to_fp32.parse_*_states`), so one extra pickled object with a `__reduce__`
would run on every rank. A file that the weights-only unpickler accepts references no global but torch's own
weights-only set and `DEEPSPEED_GLOBALS` below, none of which can run code when the full unpickler later calls
it (plain data classes and an enum). The scan builds a stand-in for each DeepSpeed class, so it imports and runs
no DeepSpeed code, and it memory-maps the tensors instead of reading them.

Used by `checkpoint.verify` (every `--resume`, before the engine is built, and `checkpoint.load`) and by
`dbot-export`. Anything new that hands a tag folder to DeepSpeed (e.g. universal-checkpoint conversion, whose
`ds_to_universal` also unpickles every `*.pt` in full) must go through `checkpoint.verify` first.

    python -m dbot_ds.checkpoint.safety check runs/vit_h/checkpoints/step00400000    # verify a tag you were given
    python -m dbot_ds.checkpoint.safety record runs/vit_h/checkpoints/step00400000   # re-record after a deliberate edit
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from dbot_ds.config import ConfigError

# Every global that DeepSpeed 0.19.8 writes into a checkpoint beyond torch's own weights-only set (tensors,
# storages, torch.Size, OrderedDict, ...). Found by saving real checkpoints (2 ranks; ZeRO-1, ZeRO-2, ZeRO-2 with
# the optimizer offloaded, ZeRO-3, ZeRO-3 with parameters and optimizer offloaded; bf16 and fp32) and listing
# what `torch.serialization.get_unsafe_globals_in_checkpoint` reports; tests/checkpoint/test_ckpt_safety.py re-checks it on
# a fresh checkpoint. fp16 (DynamicLossScaler) is not a dbot-ds precision, so it is not allowed.
DEEPSPEED_GLOBALS = {
    # optimizer_state_dict["loss_scaler"] of every ZeRO optimizer file: the static scaler (scale 1) that the
    # bf16/fp32 optimizers keep; a plain object of numbers.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "optimizer files: optimizer_state_dict['loss_scaler']",
    # optimizer_state_dict["zero_stage"] of every ZeRO optimizer file: an int enum (1, 2 or 3).
    "deepspeed.runtime.zero.config.ZeroStageEnum": "optimizer files: optimizer_state_dict['zero_stage']",
    # ZeRO-1/2 optimizer files: param_slice_mappings, where each parameter lies in the flat fp32 partition; a
    # dataclass of two ints (numel, start).
    "deepspeed.utils.tensor_fragment.fragment_address": "ZeRO-1/2 optimizer files: param_slice_mappings",
}
RECORD = "COMPLETE"          # the JSON record of the tag; never unpickled, not hashed (it holds the hashes)
TRUST_FLAG = "--trust-checkpoint"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")    # DeepSpeed's per-rank files; the rest are rank 0's
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
_CHUNK = 8 << 20


class CheckpointRefused(ConfigError):
    """A checkpoint that must not be loaded: a file holds a global outside the allow-list, or changed since the
    save. One line naming the tag, each file and the fix. dbot-pretrain and dbot-export exit with code 2."""


class _StandIn:
    """Takes the place of an allowed DeepSpeed class during the scan: nothing of DeepSpeed is imported or run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _allowed() -> list[tuple[type, str]]:
    return [(_StandIn, name) for name in DEEPSPEED_GLOBALS]


# ----------------------------------------------------------------------------------------------------------
# Hashes


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, as `sha256sum` prints it (hashlib releases the GIL: threads hash files in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through, so a file we write ourselves (teacher.pt) costs no
    second read. `torch.save(obj, HashingWriter(f))` writes sequentially; `record()` gives its COMPLETE entry."""

    def __init__(self, f):
        super().__init__()
        self._f, self._h, self._size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._h.update(b)
        self._size += memoryview(b).nbytes
        return self._f.write(b)

    def record(self) -> dict:
        return {"size": self._size, "sha256": self._h.hexdigest()}


def owner(name: str, world: int) -> int:
    """The rank that hashes (at save) and checks (at resume) a file: the rank that wrote it, so each rank reads
    its own optimizer shard while the page cache still holds it; rank 0 takes the rest (model states, teacher)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) % world if m else 0


def tag_files(tag_dir: Path) -> list[str]:
    """Relative paths of every file of a tag folder except COMPLETE."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file()
                  and p.relative_to(tag_dir).as_posix() != RECORD)


def _pool(n: int) -> cf.ThreadPoolExecutor:
    return cf.ThreadPoolExecutor(max(1, min(n, 4, os.cpu_count() or 1)))


def record_files(tag_dir: Path, rank: int = 0, world: int = 1, known: dict | None = None) -> dict[str, dict]:
    """{relpath: {"size", "sha256"}} of this rank's share of the tag folder; `known` holds entries already
    hashed while writing (not read again)."""
    known = known or {}
    names = [n for n in tag_files(tag_dir) if owner(n, world) == rank and n not in known]
    with _pool(len(names)) as ex:
        digests = ex.map(lambda n: sha256_file(tag_dir / n), names)
        out = {n: {"size": (tag_dir / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}
    return {**out, **{n: r for n, r in known.items() if owner(n, world) == rank}}


# ----------------------------------------------------------------------------------------------------------
# The pickle scan


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _offending_globals(path: Path, err: Exception) -> list[str]:
    """Every global of `path` outside the allow-list (static read of data.pkl, nothing built), or the one torch
    named when the static read cannot parse the file."""
    try:
        with torch.serialization.safe_globals(_allowed()):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if found:
            return sorted(found)
    except Exception:      # noqa: BLE001 - an opcode the static reader does not know: use torch's message
        pass
    return _GLOBAL_IN_MESSAGE.findall(str(err))[:1]


def _reason(err: Exception) -> str:
    """The line of torch's weights-only message that says what it refused (its text is several paragraphs)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                       "Please file an issue", "(1)", "(2)", "WeightsUnpickler"))]
    first = (useful or lines or [""])[0].rstrip(".")
    return first if isinstance(err, pickle.UnpicklingError) else f"{type(err).__name__}: {first}".rstrip(": ")


def scan_file(path: Path) -> tuple[str, str] | None:
    """None if torch's weights-only unpickler reads `path` with only the allowed globals (tensors memory-mapped,
    not read); else (kind, why) with kind 'unsafe' or 'unreadable'."""
    is_zip = _is_zip(path)         # what torch.save writes; anything else is a legacy or broken file
    try:
        with torch.serialization.safe_globals(_allowed()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        names = _offending_globals(path, e)
        if names:
            return "unsafe", f"{path.name} holds the pickle global{'s' if len(names) > 1 else ''} {', '.join(names)}"
        return "unsafe", f"{path.name} is refused by torch's weights-only unpickler ({_reason(e)})"
    except Exception as e:  # noqa: BLE001 - truncated / not a torch file: refused, and said so
        why = _reason(e) if is_zip else "not a complete zip archive: truncated, or not written by torch.save"
        return "unreadable", f"{path.name} cannot be read as a torch checkpoint ({why})"
    return None


# ----------------------------------------------------------------------------------------------------------
# Checking a tag


def _check_record(tag_dir: Path, name: str, rec: dict | None) -> tuple[str, str] | None:
    """('changed', why) if the file is missing, was added, or differs in size or SHA-256 from its record."""
    path = tag_dir / name
    if not path.is_file():
        return "changed", f"{name} is missing"
    if rec is None:
        return "changed", f"{name} was not part of the checkpoint when it was saved"
    size = path.stat().st_size
    if size != rec["size"]:
        return "changed", f"{name} is {size} bytes, {rec['size']} when saved (a truncated or partial copy?)"
    if sha256_file(path) != rec["sha256"]:
        return "changed", f"{name} differs from its SHA-256 recorded at save"
    return None


def _guarded(check, name: str) -> tuple[str, str] | None:
    try:
        return check()
    except OSError as e:
        return "unreadable", f"{name} cannot be read ({e.strerror or e})"


def check_share(tag_dir: Path, files: dict | None, rank: int = 0, world: int = 1,
                scan: bool = True) -> list[tuple[str, str]]:
    """Problems with this rank's share of a tag folder (`files`: COMPLETE's record, None for older checkpoints).
    Records are checked first, in a thread pool (hashing releases the GIL); then the files that match are
    scanned one after another, as `safe_globals` is process-wide and the unpickler holds the GIL anyway.
    Never raises, so every rank reaches the gather that follows."""
    names = sorted(set(tag_files(tag_dir)) | set(files or {}))
    names = [n for n in names if owner(n, world) == rank]
    problems = {}
    if files is not None:
        with _pool(len(names)) as ex:
            checks = ex.map(lambda n: _guarded(lambda: _check_record(tag_dir, n, files.get(n)), n), names)
            problems = {n: p for n, p in zip(names, checks) if p}
    for n in names if scan else []:
        if n not in problems:
            problems[n] = _guarded(lambda: scan_file(tag_dir / n), n)
    return [p for p in problems.values() if p]


_FIXES = {
    "unsafe": f"A dbot-ds or DeepSpeed checkpoint holds only tensors, plain containers and the DeepSpeed objects "
              f"listed in dbot_ds/checkpoint/safety.py, so this file was written by other code or altered; if you trust "
              f"it (you wrote it, or know who did), rerun with {TRUST_FLAG} to load it as DeepSpeed does (full "
              f"unpickling, which can run code)",
    "changed": "Copy the tag folder again from where it was saved, or use another checkpoint; if you changed the "
               "files on purpose, re-record them with `python -m dbot_ds.checkpoint.safety record {tag_dir}`",
    "unreadable": "A truncated or corrupt file: copy it again, or use another checkpoint",
}


def refusal(tag_dir: Path, problems: list[tuple[str, str]]) -> str:
    """One line: the tag, every problem, and the fix for each kind found."""
    kinds = [k for k in _FIXES if any(p[0] == k for p in problems)]
    fixes = ". ".join(_FIXES[k].format(tag_dir=tag_dir) for k in kinds)
    shown = [why for _, why in problems[:8]] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
    return f"checkpoint {tag_dir} refused before anything in it was unpickled: {'; '.join(shown)}. {fixes}."


def no_record_warning(tag_dir: Path) -> str:
    return (f"[dbot] warning: {tag_dir / RECORD} lists no file sizes or SHA-256 (saved by an older dbot-ds): a "
            "changed or truncated file cannot be detected; the pickle scan still runs")


def verify_tag(tag_dir: Path, trust: bool = False) -> None:
    """Check a whole tag folder in this process (dbot-export, `check`); raises CheckpointRefused."""
    files = json.loads((tag_dir / RECORD).read_text()).get("files")
    if files is None:
        print(no_record_warning(tag_dir), file=sys.stderr)
    problems = check_share(tag_dir, files, scan=not trust)
    if problems:
        raise CheckpointRefused(refusal(tag_dir, problems))


def load_teacher_file(path: Path, trust: bool = False) -> dict:
    """`teacher.pt` ({'depth', 'state'}), weights-only unless trusted; a refusal is one line, not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        names = _offending_globals(path, e)
        what = f"the pickle global {', '.join(names)}" if names else _reason(e)
        raise CheckpointRefused(
            f"{path} was refused by torch's weights-only loader ({what}); dbot-ds writes teacher.pt as plain "
            f"tensors and an int, so it was written by other code or altered. Restore it from the original run, "
            f"use another checkpoint, or, if you trust the file, rerun with {TRUST_FLAG}") from None


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dbot_ds.checkpoint.safety", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["check", "record"],
                    help="check: verify sizes, SHA-256 and the pickle scan; record: write the current files' sizes "
                         "and SHA-256 into COMPLETE (after changing them on purpose)")
    ap.add_argument("tag_dir", type=Path, help="a checkpoint tag folder (holding COMPLETE)")
    args = ap.parse_args(argv)
    record = args.tag_dir / RECORD
    if not record.is_file():
        print(f"{args.tag_dir} has no {RECORD}: not a complete dbot-ds checkpoint", file=sys.stderr)
        return 2
    if args.command == "record":
        meta = json.loads(record.read_text())
        meta["files"] = record_files(args.tag_dir)
        tmp = record.with_name(RECORD + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, record)
        print(f"recorded {len(meta['files'])} files in {record}")
        return 0
    try:
        verify_tag(args.tag_dir)
    except CheckpointRefused as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.tag_dir}: every file matches its record and holds only allowed globals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
