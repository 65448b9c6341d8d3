"""A rank that dies or hangs: the survivor stops within the collective timeout, naming the lost rank (real
processes: two plain `python -m dbot_ds.pretrain` ranks rendezvousing by environment, so no launcher kills the
survivor for us, as with ranks on different nodes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, _env, free_port, last_wins, read_metrics

pytestmark = pytest.mark.slow       # every test here starts real processes or trains a run


def start_ranks(tmp_path, shards, timeout_s: int) -> list[subprocess.Popen]:
    port = free_port()
    args = last_wins(TINY + [f"data.shards={shards}", f"run.out_dir={tmp_path / 'run'}", "schedule.stage_steps=[400]",
                             "run.log_every=1", "run.save_every=1000", f"run.collective_timeout_s={timeout_s}",
                             "optim.precision=fp32"])
    procs = []
    for rank in range(2):
        env = _env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
        log = open(tmp_path / f"rank{rank}.log", "w")              # a file: an unread pipe would fill and block
        procs.append(subprocess.Popen([sys.executable, "-m", "dbot_ds.pretrain", "--preset", "demo"] + args, cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    while not any("loss" in m and m["step"] >= 3 for m in read_metrics(tmp_path / "run")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "ranks never trained"
        time.sleep(0.5)
    return procs


@pytest.mark.parametrize("how", ["hangs", "dies"])
def test_survivor_names_the_lost_rank_within_the_timeout(tmp_path, shards, how):
    procs = start_ranks(tmp_path, shards, timeout_s=10)
    os.kill(procs[1].pid, signal.SIGSTOP if how == "hangs" else signal.SIGKILL)
    t0 = time.monotonic()
    try:
        procs[0].wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    elapsed = time.monotonic() - t0
    out = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode == 4, out[-3000:]
    assert "dbot-pretrain: lost rank 1 (last heartbeat" in out, out[-3000:]
    assert "--resume auto" in out
    # dead: the sockets close and the survivor stops at once; hung: after the 10 s collective timeout.
    assert elapsed < (60 if how == "dies" else 10 + 60), elapsed
