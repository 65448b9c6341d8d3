"""prepare_op_builds against real lock files, real lock-holding processes and real orphan processes.

torch locks a JIT build on <op folder>/lock either by the file's existence (FileBaton, older torch) or by flock
(filelock, newer torch): both kinds are exercised here; the installed torch picks one when existence_lock=None."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbot_ds.distributed.op_build import prepare_op_builds

OP = "deepspeed_shm_comm"


@pytest.fixture
def op_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")        # the shm op is built on DeepSpeed's CPU accelerator only
    folder = tmp_path / "ext" / OP
    folder.mkdir(parents=True)
    return folder


def _leftover_lock(folder: Path) -> Path:
    """A lock file as a killed build leaves it, older than the guard for a lock being created this instant."""
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    return lock


def _start(code: str, ready: Path) -> subprocess.Popen:
    """A real process that takes the lock the way torch does, once `ready` exists."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=5)


def test_stale_filebaton_lock_is_removed_and_said(op_dir, capsys):
    lock = _leftover_lock(op_dir)
    prepare_op_builds(existence_lock=True)
    out = capsys.readouterr().out
    assert not lock.exists()
    assert f"[dbot] removed a stale build lock {lock} left by an interrupted build (no process holds it)" in out
    assert f"[dbot] building DeepSpeed's C++ op {OP} (CPU all-reduce) into {op_dir}" in out    # no .so yet


def test_filebaton_lock_held_by_live_process_is_kept_and_its_pid_named(op_dir, capsys):
    lock, ready = _leftover_lock(op_dir), op_dir.parent / "ready"
    holder = _start(f"import os,time; fd=os.open({str(lock)!r}, os.O_RDONLY); open({str(ready)!r}, 'w').close(); "
                    f"time.sleep(60)", ready)
    try:
        prepare_op_builds(existence_lock=True)
        out = capsys.readouterr().out
        assert lock.exists()
        assert f"[dbot] waiting for DeepSpeed's {OP} op being built by pid {holder.pid} (" in out
        assert "removed a stale" not in out and "building" not in out    # it is the holder's build, not ours
    finally:
        _stop(holder)


def test_flock_lock_held_by_live_process_names_its_pid(op_dir, capsys):
    lock, ready = op_dir / "lock", op_dir.parent / "ready"
    holder = _start(f"import time; from filelock import FileLock; l=FileLock({str(lock)!r}); l.acquire(); "
                    f"open({str(ready)!r}, 'w').close(); time.sleep(60)", ready)      # what torch 2.14 takes
    try:
        prepare_op_builds(existence_lock=False)
        out = capsys.readouterr().out
        assert lock.exists()
        assert f"[dbot] waiting for DeepSpeed's {OP} op being built by pid {holder.pid} (" in out
    finally:
        _stop(holder)


def test_unheld_flock_lock_is_normal_and_left_alone(op_dir, capsys):
    """filelock keeps the file after every build; removing it could split a waiter from the holder's inode."""
    lock = _leftover_lock(op_dir)
    (op_dir / f"{OP}.so").touch()
    prepare_op_builds(existence_lock=False)
    assert lock.exists() and capsys.readouterr().out == ""


def test_installed_torch_decides_whether_a_leftover_lock_is_stale(op_dir, capsys):
    import torch.utils.cpp_extension as cpp_ext
    uses_baton = "FileBaton(os.path.join(build_directory, 'lock'))" in Path(cpp_ext.__file__).read_text()
    lock = _leftover_lock(op_dir)
    (op_dir / f"{OP}.so").touch()
    prepare_op_builds()                                   # existence_lock=None: read from the installed torch
    assert lock.exists() != uses_baton
    assert ("removed a stale build lock" in capsys.readouterr().out) == uses_baton


@pytest.mark.parametrize("existence_lock", [True, False])
def test_leftover_compiler_in_op_folder_is_stopped(op_dir, tmp_path, capsys, existence_lock):
    """A real process named like gcc's compiler proper, cwd in the op folder, as a killed build leaves it."""
    fake = tmp_path / "bin" / "cc1plus"
    fake.parent.mkdir()
    shutil.copy(shutil.which("sleep"), fake)
    orphan = subprocess.Popen([str(fake), "60"], cwd=op_dir)
    bystander = subprocess.Popen([shutil.which("sleep"), "60"], cwd=op_dir)      # not a compiler: kept
    try:
        _leftover_lock(op_dir)
        prepare_op_builds(existence_lock=existence_lock)
        assert orphan.wait(timeout=5) == -15                          # SIGTERM
        assert bystander.poll() is None
        out = capsys.readouterr().out
        assert (f"stopped 1 leftover compiler process(es) of an interrupted {OP} build: pid {orphan.pid} (cc1plus)"
                in out)
        assert (op_dir / "lock").exists() != existence_lock            # only a FileBaton lock is removed
    finally:
        for p in (orphan, bystander):
            _stop(p)


def test_build_announced_only_while_the_library_is_missing(op_dir, capsys):
    prepare_op_builds(existence_lock=False)
    out = capsys.readouterr().out
    assert out.count("[dbot] building") == 1
    assert (f"[dbot] building DeepSpeed's C++ op {OP} (CPU all-reduce) into {op_dir}: once per environment, about "
            f"2-3 minutes on 2 cores; needs a C++ compiler") in out
    (op_dir / f"{OP}.so").touch()                         # torch's name: <build dir>/<name>.so (version 0)
    prepare_op_builds(existence_lock=False)
    prepare_op_builds(existence_lock=False, announce=True)
    assert capsys.readouterr().out == ""


def test_nothing_for_the_shm_op_off_deepspeeds_cpu_accelerator(op_dir, monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")          # DeepSpeed's CUDA op builders have no shm op
    _leftover_lock(op_dir)
    prepare_op_builds(existence_lock=True)
    assert (op_dir / "lock").exists() and capsys.readouterr().out == ""


@pytest.mark.slow
def test_missing_data_is_reported_before_any_op_build(tmp_path):
    """With no op built yet (an empty extensions folder), a wrong data.shards fails at once: no build starts."""
    ext = tmp_path / "ext"
    ext.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = subprocess.run([sys.executable, "-m", "dbot_ds.pretrain", "--preset", "demo", "optim.precision=fp32",
                           f"data.shards={tmp_path / 'missing'}", "data.synthetic_num=0",
                           f"run.out_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.shards={tmp_path / 'missing'} does not exist" in proc.stderr
    assert "building DeepSpeed" not in proc.stdout and not any(ext.iterdir())
