"""Before DeepSpeed JIT-builds a C++ op: say so, and clear what an interrupted build left behind.

On CPU, `deepspeed.init_distributed()` builds its shm all-reduce (`deepspeed_shm_comm`; `DeepSpeedCPUAdam` builds
`cpu_adam` the same way) with torch.utils.cpp_extension.load into $TORCH_EXTENSIONS_DIR/<name>/<name>.so: minutes on
first use, in silence. torch serialises builders on <name>/lock in one of two ways, chosen by its version:
- FileBaton (older torch): the file's existence is the lock. A builder killed by SIGKILL/SIGTERM leaves it, and
  every later load polls for it to vanish, forever and without output.
- filelock/flock (newer torch, e.g. 2.14): the kernel drops the lock with its holder and the file stays after
  every build, so a leftover file is normal and must not be removed (a waiter may hold that very inode).
Either way, when only the Python process is killed, the compilers ninja started run on and write the same object
files as the next build. No DeepSpeed import here: this runs before DeepSpeed is needed."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

_WHAT = {"deepspeed_shm_comm": "CPU all-reduce", "cpu_adam": "CPU Adam for optimizer offload"}
# Never a shell or editor that merely sits in the folder: only what ninja runs (comm is cut to 15 characters).
_COMPILER = re.compile(r"ninja|cc1(plus)?|collect2|as|ld(\.\w+)?|(.*-)?(c\+\+|g\+\+|gcc|cc|clang(\+\+)?)(-[\d.]+)?"
                       r"|x86_64-linux-gn.*|aarch64-linux-g.*")


def prepare_op_builds(names=("deepspeed_shm_comm",), announce=True, *, existence_lock: bool | None = None,
                      min_age_s: float = 1.0) -> None:
    """Call right before anything that may build the DeepSpeed ops `names`, in one process per machine, before
    the other processes there can reach the build: a FileBaton waiter whose lock vanishes loads without building.

    A lock that a live process holds: prints whose build this run waits for. A stale FileBaton lock (no process
    has it open, older than `min_age_s`): stops the compilers left in the op folder, removes the lock and says so.
    An unheld flock lock: stops left-over compilers only. A missing `<name>.so` with `announce`: says that the
    build starts and what it needs. `existence_lock`: None reads the kind from the installed torch."""
    if not sys.platform.startswith("linux") or not (root := os.environ.get("TORCH_EXTENSIONS_DIR")):
        return                                        # /proc is Linux-only; so is DeepSpeed's shm op
    if existence_lock is None:
        import torch.utils.cpp_extension as cpp_ext   # imports FileBaton only in the torch versions that use it
        existence_lock = hasattr(cpp_ext, "FileBaton")
    for name in names:
        if name == "deepspeed_shm_comm" and not _shm_op_is_built():
            continue
        folder = Path(root) / name
        built = (folder / f"{name}.so").exists() or _prebuilt(name)     # torch names it <name>.so
        if _check_lock(name, folder, existence_lock, min_age_s) and announce and not built:
            cxx = shutil.which(os.environ.get("CXX", "c++"))
            _say(f"building DeepSpeed's C++ op {name} ({_WHAT.get(name, 'C++ extension')}) into {folder}: once per "
                 f"environment, about 2-3 minutes on 2 cores; needs a C++ compiler"
                 + ("" if cxx else f" (none found: {os.environ.get('CXX', 'c++')} is not on PATH)"))


def _check_lock(name: str, folder: Path, existence_lock: bool, min_age_s: float) -> bool:
    """False when another live process is building the op (and this one will wait for it)."""
    lock = folder / "lock"
    if not lock.exists():
        return True
    if existence_lock:
        holder = _fd_holder(lock)
        if holder is None:     # look again: FileBaton.release closes its fd before it removes the file, and a
            time.sleep(max(0.2, min_age_s - _age_s(lock)))     # new lock exists an instant before its fd does
            if not lock.exists():
                return True
            holder = _fd_holder(lock)
        if holder is not None:
            return _waiting(name, holder)
        _stop_leftover_compilers(name, folder)         # first: while the lock stands no new build can start
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        _say(f"removed a stale build lock {lock} left by an interrupted build (no process holds it); the op is rebuilt")
        return True
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # while this process holds it, no build can start
        _stop_leftover_compilers(name, folder)
    except BlockingIOError:
        return _waiting(name, _flock_holder(lock) or _fd_holder(lock))
    except OSError:
        pass                                    # no flock on this filesystem (filelock then uses a soft lock)
    finally:
        os.close(fd)                            # releases the flock
    return True


def _waiting(name: str, pid: int | None) -> bool:
    who = f"pid {pid}" if pid else "another process (not visible here)"
    _say(f"waiting for DeepSpeed's {name} op being built by {who} (another process of this Python environment; "
         f"a first build takes about 2-3 minutes on 2 cores; this run goes on when it ends)")
    return False


def _stop_leftover_compilers(name: str, folder: Path) -> None:
    """SIGTERM the compiler processes whose cwd is in `folder` (ninja runs them there). Called only while no
    builder can run, so they belong to an interrupted build; waits up to 2 s for them to end."""
    stopped = {}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            cwd, comm = os.readlink(f"{proc}/cwd"), Path(f"{proc}/comm").read_text().strip()
            if (cwd == str(folder) or cwd.startswith(f"{folder}/")) and _COMPILER.fullmatch(comm):
                os.kill(int(proc[6:]), signal.SIGTERM)
                stopped[int(proc[6:])] = comm
        except (OSError, ValueError):
            continue
    if stopped:
        _say(f"stopped {len(stopped)} leftover compiler process(es) of an interrupted {name} build: "
             + ", ".join(f"pid {p} ({c})" for p, c in stopped.items()))
    deadline = time.monotonic() + 2.0
    while any(_alive(p) for p in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)


def _fd_holder(path: Path) -> int | None:
    """A live process with `path` open: torch's builder keeps its lock fd open for the whole build; its ninja and
    compilers do not inherit it (Python fds are not inheritable)."""
    target = str(path)
    for proc in glob.glob("/proc/[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if int(proc[6:]) != os.getpid() and any(os.readlink(f"{proc}/fd/{fd}") == target
                                                     for fd in os.listdir(f"{proc}/fd")):
                return int(proc[6:])
    return None


def _flock_holder(path: Path) -> int | None:
    """The flock holder from /proc/locks (exact; waiters of filelock also open the file for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        ino = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(ino):
                return int(f[4])
    return None


def _shm_op_is_built() -> bool:
    """DeepSpeed builds the shm op only on its CPU accelerator (deepspeed/comm/torch.py: build_shm_op; the CUDA op
    builders have none), and it honours DS_ACCELERATOR first."""
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"] == "cpu"
    if (real := sys.modules.get("deepspeed.accelerator.real_accelerator")) is not None:
        return real.get_accelerator()._name == "cpu"
    import torch
    return not torch.cuda.is_available()


def _prebuilt(name: str) -> bool:         # compiled at DeepSpeed's install (DS_BUILD_*=1): loaded, never built
    return bool(getattr(sys.modules.get("deepspeed.git_version_info"), "installed_ops", {}).get(name))


def _alive(pid: int) -> bool:                  # an ended child that is not reaped yet (state Z) counts as ended
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _age_s(path: Path) -> float:
    with contextlib.suppress(OSError):
        return time.time() - os.stat(path).st_mtime
    return 0.0


def _say(msg: str) -> None:
    print(f"[dbot] {msg}", flush=True)
