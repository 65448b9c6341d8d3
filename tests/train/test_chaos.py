"""Crash safety in CI: a short run of tests/chaos.py (one SIGKILL of the whole 2-process job while it writes the
stage-end checkpoint, then the resume), then the stale /dev/shm sweep on its own. The long run (30+ kills per
data mode: also mid-checkpoint, right after a resume and during a resume's start-up) is `python tests/chaos.py`,
recorded in BENCHMARKS.md."""
from __future__ import annotations

import os
import time
from pathlib import Path

import chaos
import pytest

# In run order; each is reachable from where the previous kill leaves the run (see chaos.next_target).
CI_KILLS = ["switch_ckpt"]


@pytest.mark.slow
def test_killed_job_resumes_to_identical_losses(tmp_path, shards):
    report = chaos.run_variant(Path(shards), tmp_path, "resampled", CI_KILLS, seed=0, log=lambda *a: None)
    s = chaos.summarize(report)
    problems = report["violations"] + report["final_violations"]
    assert not problems, "\n".join(problems)
    assert s["kills"] == len(CI_KILLS) and report["substituted"] == 0, report["kills"]
    assert not report["crashes"], report["crashes"]      # a rank that died by itself
    # Bit-identical per-step losses after the kill and resume (same layout: 2 ranks, ZeRO-2).
    assert report["losses_identical"], s
    # Nothing piles up: each launch removes the shm buffers its killed predecessors left (dbot_ds.distributed.groups),
    # a partial tag is rewritten when its step comes round again, and a normal exit leaves nothing.
    assert s["shm_files_max"] <= 2, report["kills"]
    assert s["partial_tags_max"] <= 1, report["kills"]
    assert s["at_end"]["shm_files"] == 0 and s["at_end"]["partial_tags"] == [] and s["at_end"]["tmp_files"] == []


def _fake_buffer(name: str, age_s: float) -> str:
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{name}_{os.getpid()}_0"
    Path(path).write_bytes(b"\0" * 64)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def test_stale_shm_buffers_are_swept_live_ones_kept():
    from dbot_ds.distributed.groups import _remove_stale_cpu_shm_buffers
    stale = _fake_buffer("chaos.stale", age_s=60)
    held = _fake_buffer("chaos.held", age_s=60)
    young = _fake_buffer("chaos.young", age_s=0)
    fd = os.open(held, os.O_RDWR)            # a live process holds it, as DeepSpeed holds its own for life
    try:
        _remove_stale_cpu_shm_buffers()
        assert not os.path.exists(stale)
        assert os.path.exists(held) and os.path.exists(young)
    finally:
        os.close(fd)
        for p in (stale, held, young):
            if os.path.exists(p):
                os.unlink(p)
