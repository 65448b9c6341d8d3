"""Process-group setup and the few collectives the trainer needs. Works under the deepspeed launcher, torchrun,
accelerate launch and as a single plain process."""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    """The world size before any process group exists, so batch errors come before anything is built."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """torch.distributed's process group (no DeepSpeed yet); returns (rank, world_size, device).

    A plain `python` process has no RANK/WORLD_SIZE/MASTER_*: DeepSpeed would fall back to MPI discovery and
    fail, so a world of one is declared here. Rank and world size always come from torch.distributed
    (accelerate's state can report 1 process under its DeepSpeed plugin on CPU). Every collective fails after
    `timeout_s` seconds instead of waiting forever for a rank that hangs. Split from `init_deepspeed` so that a
    run checks its data (a collective) before DeepSpeed builds its CPU op (minutes on first use)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(seconds=timeout_s)
    # DeepSpeed builds its ZeRO data-parallel groups with dist.new_group(), which takes torch's module default
    # timeout (30 min gloo, 10 min NCCL), not the world group's: set the default itself, so every group honours it.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        # Created here, not by DeepSpeed: on its CPU accelerator DeepSpeed 0.19.8 builds the gloo group without
        # the timeout it is given.
        dist.init_process_group(backend=backend, timeout=timeout)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def init_deepspeed(timeout_s: float = 600.0) -> None:
    """DeepSpeed's communication layer over the existing group. On a CPU it builds (once per environment, in
    C++) and maps its shared-memory all-reduce: announced, and an interrupted earlier build cleared first."""
    import deepspeed

    cuda = torch.cuda.is_available()
    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(seconds=timeout_s)
    if not cuda and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _remove_stale_cpu_shm_buffers()          # before DeepSpeed creates this launch's own
        from .op_build import prepare_op_builds
        prepare_op_builds()     # says that the shm op is built (minutes, once); clears an interrupted build's leftovers
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    if not cuda:
        atexit.register(_unlink_cpu_shm_buffers, dist.get_rank())


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Both steps at once (benchmarks and probes): returns (rank, world_size, device)."""
    rank, world, device = init_process_group(timeout_s)
    init_deepspeed(timeout_s)
    return rank, world, device


def _unlink_cpu_shm_buffers(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (shm comm op, 0.19.8) leaves a ~70 MB file per rank in /dev/shm and never
    removes it; runs add up until RAM is full. Peers map it at init, so removing it at exit is safe."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _remove_stale_cpu_shm_buffers(min_age_s: float = 1.0) -> None:
    """A rank killed by SIGKILL (OOM killer, scheduler, node agent) never runs its atexit, so its buffer stays,
    and every relaunch adds 2 x 70 MB under a new MASTER_PORT. Remove this user's buffers that no live process
    holds: DeepSpeed keeps each one's fd open (and mapped) for the life of the process, so an unheld one is stale.
    Listed before /proc is scanned, so a buffer created meanwhile is never a candidate; min_age_s covers the
    instant inside shm_open between the file's creation and its fd. Processes in another PID namespace that
    share this /dev/shm are invisible here: run such jobs with their own /dev/shm."""
    candidates = [p for p in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*")
                  if _age_s(p) >= min_age_s]
    if not candidates:
        return
    held = set()
    for proc in glob.glob("/proc/[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{proc}/fd"):
                with contextlib.suppress(OSError):
                    held.add(os.readlink(f"{proc}/fd/{fd}"))
        with contextlib.suppress(OSError), open(f"{proc}/maps") as maps:
            held.update(line.split(None, 5)[5].strip() for line in maps if "deepspeed_allreduce_buffer_" in line)
    for path in candidates:
        if path not in held:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _age_s(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return -1.0


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a world of one without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
