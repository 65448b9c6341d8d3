"""Shared fixtures: a small synthetic shard set and helpers that start real training processes."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_0-9]+=")

ROOT = Path(__file__).resolve().parents[1]

# torch.compile's on-disk cache is keyed without ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA (torch 2.14): code
# compiled under one cap and loaded under another gave NaN or aborted the whole pytest process (a Xeon run natively
# after an AVX2-capped run). One cache per cap; a user's own TORCHINDUCTOR_CACHE_DIR wins.
_CAP = "-".join(os.environ.get(k, "native") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")).lower()
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_dbot_tests_{_CAP}")

# Tiny two-stage run used by the multi-process tests: 2 ranks x micro 8 = global 16, no loader workers.
TINY = ["schedule.stage_epochs=[]", "schedule.warmup_epochs=0", "optim.global_batch=16", "optim.micro_batch=8",
        "data.num_workers=0", "data.shuffle_buffer=32", "run.progress=false",
        "eval.shards=", "eval.synthetic_num=0"]        # the demo's kNN monitor off, unless a test turns it on


@pytest.fixture(autouse=True)
def no_leaked_shm_buffers():
    """Remove DeepSpeed CPU all-reduce buffers that a killed or crashed test process left in /dev/shm (normal
    exits remove their own). Only buffers no live process holds: another job on this machine (a user's training,
    a second test run) keeps its own."""
    yield
    from dbot_ds.distributed.groups import _remove_stale_cpu_shm_buffers
    _remove_stale_cpu_shm_buffers()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """A folder of 256 generated 64-px JPEGs in webdataset shards, with manifest.json."""
    from dbot_ds.data.synthetic import write_synthetic_shards
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, 256, img_size=64, per_shard=64, seed=0)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def deepspeed_cmd(nproc: int) -> list[str]:
    exe = shutil.which("deepspeed")
    launcher = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return launcher + ["--num_gpus", str(nproc), "--master_port", str(free_port())]


def torchrun_cmd(nproc: int) -> list[str]:
    """torchrun: it sets the same RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* as the `deepspeed` launcher, without
    that launcher's two extra DeepSpeed imports before the ranks start (a 2-rank launch here: 11 s instead of 26 s).
    torchrun exits 1 for any failed rank; `run` reads the ranks' own exit code from its report (test_launch tests
    the `deepspeed` launcher itself)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]


# torchrun's failure report: its own traceback (ChildFailedError), then per failed rank "exitcode  : N".
_TORCHRUN_REPORT = re.compile(r"Traceback \(most recent call last\):\n(?:(?!Traceback).*\n)*?"
                              r"torch\.distributed\.elastic\.multiprocessing\.errors\.ChildFailedError:.*\n"
                              r"(?:.*\n)*?Root Cause \(first observed failure\):\n(?:.*\n)*?\s*exitcode\s*: (-?\d+)"
                              r"(?:.*\n)*?=+\n?")


def _rank_exit_code(proc: subprocess.CompletedProcess) -> None:
    """A failed torchrun launch: its exit code becomes the first failed rank's, and its own traceback and report
    leave the output (tests check the ranks' output, e.g. that no rank printed a traceback)."""
    for name in ("stdout", "stderr"):
        text = getattr(proc, name)
        match = _TORCHRUN_REPORT.search(text)
        if match:
            proc.returncode = int(match.group(1))
            setattr(proc, name, text[:match.start()] + text[match.end():])


def last_wins(cmd: list[str]) -> list[str]:
    """Tests build overrides as TINY + specific ones; dbot-pretrain refuses a key given twice, so keep the last."""
    last = {arg.split("=", 1)[0]: i for i, arg in enumerate(cmd) if OVERRIDE.match(arg)}
    return [arg for i, arg in enumerate(cmd) if not OVERRIDE.match(arg) or last[arg.split("=", 1)[0]] == i]


def fp32_unless_named(cmd: list[str]) -> list[str]:
    """Training commands (those given --preset or --config) run in fp32 unless the test names optim.precision:
    bf16 is the subject of only a few tests, and a CPU without AVX512-BF16 / AMX emulates it about 20x slower.
    Explicit, so a test trains the same way on every machine whatever `auto` would choose there."""
    if any(a.startswith("optim.precision=") for a in cmd):
        return cmd
    for i, arg in enumerate(cmd):
        if arg in ("--preset", "--config"):
            return cmd[:i + 2] + ["optim.precision=fp32"] + cmd[i + 2:]
    return cmd


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure show its output's tail. The timeout is generous: a busy
    machine (or DeepSpeed's one-off op build) can make a 30 s run take minutes, and that is not a failure of ours."""
    cmd = fp32_unless_named(last_wins(cmd))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")[-4000:]
        pytest.fail(f"`{' '.join(cmd)}` did not finish in {timeout} s. Is the machine overloaded, or is DeepSpeed "
                    f"building its CPU op (see its output)? Last output:\n{out}", pytrace=False)
    if proc.returncode and "torch.distributed.run" in cmd:
        _rank_exit_code(proc)
    proc.tail = (proc.stdout + proc.stderr)[-6000:]
    return proc


def launch_pretrain(nproc: int, overrides: list[str], expect_rc: int = 0,
                    launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`dbot_ds.pretrain --preset demo ...` on N ranks under torchrun (or launcher="deepspeed": `deepspeed
    --num_gpus N`); a plain process for N = 0. `expect_rc`: the ranks' exit code."""
    if nproc and launcher == "deepspeed":
        cmd = deepspeed_cmd(nproc) + ["--module", "dbot_ds.pretrain", "--preset", "demo"] + overrides
    elif nproc:
        cmd = torchrun_cmd(nproc) + ["-m", "dbot_ds.pretrain", "--preset", "demo"] + overrides
    else:
        cmd = [sys.executable, "-m", "dbot_ds.pretrain", "--preset", "demo"] + overrides
    proc = run(cmd)
    assert proc.returncode == expect_rc, proc.tail
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    from dbot_ds.train.metrics import read_metrics as read
    return read(run_dir)
