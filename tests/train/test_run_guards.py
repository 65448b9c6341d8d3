"""Runs that must stop or refuse instead of training the wrong thing, with real processes: skipped optimizer steps
(2 ranks, ZeRO-2 and ZeRO-3), a resume on a dataset of another size, skip counts across a resume, and a run
folder that is read-only or full."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY, launch_pretrain, read_metrics, run, torchrun_cmd
from testkit import resume_check

from dbot_ds.config import ConfigError
from dbot_ds.data.synthetic import write_synthetic_shards

pytestmark = pytest.mark.slow       # every test here starts real processes or trains a run


def _records(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "loss" in m]


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_skipped_steps_are_counted_and_a_run_of_them_stops(tmp_path, shards, ds, monkeypatch):
    """Non-finite gradients (finite loss) at step 2 (isolated: counted, training goes on) and steps 6-8 (three
    in a row: the run stops at the next sync, before the checkpoint due at step 8, naming step 6)."""
    monkeypatch.setenv("DBOT_POISON_STEPS", "2,6,7,8")
    overrides = TINY + [f"data.shards={shards}", f"run.out_dir={tmp_path}", "schedule.stage_steps=[12]",
                        "schedule.warmup_steps=1", "run.log_every=4", "run.save_every=4", f"deepspeed.config={ds}",
                        "optim.precision=bf16"]      # the subject: DeepSpeed's bf16 overflow check
    proc = run(torchrun_cmd(2) + ["tests/skip_probe.py", "--preset", "demo"] + overrides)
    assert proc.returncode == 3, proc.tail
    assert ("DeepSpeed skipped 3 optimizer steps in a row, from stage 0, step 6 of the stage (global step 6)"
            in proc.tail), proc.tail
    assert "restarts from step00000004" in proc.tail
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts == ["step00000004"]
    assert [(m["step"], m["skipped_steps"]) for m in _records(tmp_path)] == [(4, 1)]


def test_isolated_skip_is_logged_not_fatal(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("DBOT_POISON_STEPS", "3")
    overrides = TINY + [f"data.shards={shards}", f"run.out_dir={tmp_path}", "schedule.stage_steps=[4]",
                        "optim.micro_batch=16", "run.log_every=2", "run.save_every=100", "optim.precision=bf16"]
    proc = run(["python", "tests/skip_probe.py", "--preset", "demo"] + overrides)
    assert proc.returncode == 0, proc.tail
    assert [(m["step"], m["skipped_steps"]) for m in _records(tmp_path)] == [(2, 0), (4, 1)]


def test_resume_refuses_another_dataset_size_unless_the_saved_plan_is_kept(tmp_path, shards):
    """256 images / global batch 64 = 4 steps an epoch; stages [1, 1] epochs = [4, 4] steps. After the stage-0
    end, a 512- or 128-image dataset would move the stage boundaries: refused both ways, naming both values."""
    common = ["schedule.stage_epochs=[1,1]", "schedule.warmup_epochs=0", "data.num_workers=0", "run.progress=false",
              "run.save_every=100", "data.shuffle_buffer=32", f"run.out_dir={tmp_path / 'run'}"]
    launch_pretrain(0, common + [f"data.shards={shards}", "run.stop_after_steps=4"])
    for n in (512, 128):               # the start's own check, in this process (test_distributed: a refused launch)
        other = tmp_path / f"data{n}"
        write_synthetic_shards(other, n, img_size=32, per_shard=64)
        with pytest.raises(ConfigError) as refused:
            resume_check(tmp_path / "run", common + [f"data.shards={other}"])
        message = str(refused.value)
        assert "written for a dataset of 256 samples and a stage plan of [4, 4] steps" in message, message
        assert f"this run has {n} samples" in message and f"[{n // 64}, {n // 64}]" in message
        assert "run.keep_saved_plan=true" in message
    proc = launch_pretrain(0, common + [f"data.shards={tmp_path / 'data512'}", "run.keep_saved_plan=true"])
    assert "at step 4 (stage 1)" in proc.tail and "done: step 8/8" in proc.tail
    switches = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "stage_switch"]
    assert [s["step"] for s in switches] == [4]
    assert [m["stage"] for m in _records(tmp_path / "run") if m["step"] > 4] == [1]


def _corrupt_copy(src: str, dst: Path) -> None:
    """The shards of `src` with one JPEG in each of shards 1 and 3 truncated (2 corrupt samples an epoch)."""
    import tarfile
    dst.mkdir()
    for p in sorted(Path(src).iterdir()):
        data = p.read_bytes()
        if p.name in ("shard-000001.tar", "shard-000003.tar"):
            with tarfile.open(p) as tf:
                m = [m for m in tf.getmembers() if m.name.endswith(".jpg")][7]
            body = bytearray(data)
            body[m.offset_data + 200: m.offset_data + m.size] = b"\0" * (m.size - 200)   # same size, broken JPEG
            data = bytes(body)
        (dst / p.name).write_bytes(data)


def test_skipped_samples_after_resume_equal_an_uninterrupted_run(tmp_path, shards):
    """Exact epochs, 2 ranks, 2 corrupt samples an epoch: every log step's running total is the same with and
    without a resume (the checkpoint stores the total over ranks, and each skip counts in its own step)."""
    data = tmp_path / "data"
    _corrupt_copy(shards, data)
    common = TINY + [f"data.shards={data}", "data.resampled=false", "schedule.stage_steps=[12]",
                     "schedule.warmup_steps=1", "run.log_every=1", "run.save_every=5"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    launch_pretrain(2, common + [f"run.out_dir={full}"])
    # The interrupted run: the full run's folder as it stood when its step-5 checkpoint was the latest (one launch
    # fewer than training steps 1-5 again; the resume below reads only that checkpoint and truncates the log).
    shutil.copytree(full, parts)
    ckpts = parts / "checkpoints"
    for later in ckpts.glob("step*"):
        if later.name > "step00000005":
            shutil.rmtree(later)
    (ckpts / "latest").write_text("step00000005")
    proc = launch_pretrain(2, common + [f"run.out_dir={parts}"])
    assert "resumed from" in proc.tail and "at step 5" in proc.tail, proc.tail
    expected = {m["step"]: m["skipped_samples"] for m in _records(full)}
    got = {m["step"]: m["skipped_samples"] for m in _records(parts)}
    assert sorted(got) == list(range(1, 13)) and got == expected
    # 12 steps x 16 images = 192 of 256 + padding repeats: the first epoch's two corrupt samples, counted once.
    assert expected[12] == 2


def _mount(kind: str, target: Path, size_kb: int = 0) -> None:
    target.mkdir(parents=True, exist_ok=True)
    cmd = (["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(target)] if kind == "tmpfs"
           else ["mount", "--bind", "-o", "ro", str(target), str(target)])
    if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (CI runs as root)")


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield lambda kind, target, size_kb=0: (_mount(kind, target, size_kb), done.append(target))
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_read_only_run_folder_is_one_clear_line(tmp_path, shards, mounts):
    out = tmp_path / "ro"
    mounts("ro", out)
    proc = launch_pretrain(0, TINY + [f"data.shards={shards}", f"run.out_dir={out / 'run'}",
                                      "schedule.stage_steps=[2]"], expect_rc=2)
    assert "is not writable (Read-only file system)" in proc.tail and "Traceback" not in proc.tail


def test_full_disk_keeps_latest_and_resume_continues(tmp_path, shards, mounts):
    """The first checkpoint fits on a small tmpfs, the second does not: the run fails naming the folder and the
    bytes, `latest` stays on the first, and after the disk grows `--resume auto` finishes the run."""
    out = tmp_path / "disk"
    mounts("tmpfs", out, 24 * 1024)
    common = TINY + [f"data.shards={shards}", f"run.out_dir={out}", "schedule.stage_steps=[4]",
                     "optim.micro_batch=16", "run.save_every=2", "run.keep_last=5"]
    first = launch_pretrain(0, common + ["run.stop_after_steps=2"])
    size = sum(p.stat().st_size for p in (out / "checkpoints" / "step00000002").rglob("*") if p.is_file())
    filler = out / "filler"
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    filler.write_bytes(b"\0" * max(0, free - size // 2))             # leave room for half a checkpoint
    proc = launch_pretrain(0, common, expect_rc=2)
    assert f"no space left in {out / 'checkpoints'}" in proc.tail and "GiB free" in proc.tail, proc.tail
    assert "Traceback" not in proc.tail
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    assert not (out / "checkpoints" / "step00000004").exists()
    filler.unlink()
    proc = launch_pretrain(0, common)
    assert "resumed from" in proc.tail and "at step 2" in proc.tail and "done: step 4/4" in proc.tail
    assert first.returncode == 0


def test_time_boxed_stop_saves_first_and_logs_plain_lines(tmp_path, shards):
    """run.stop_after_steps off the save grid still writes a checkpoint (and says where), and counts the steps of
    each invocation (a time-boxed job run again trains the next N steps); output that is not a
    terminal gets plain log lines instead of a tqdm bar redrawn with carriage returns."""
    common = TINY + [f"data.shards={shards}", f"run.out_dir={tmp_path}", "schedule.stage_steps=[1,3]",
                     "optim.micro_batch=16", "run.save_every=100", "run.log_every=1", "run.progress=true",
                     "run.stop_after_steps=2"]
    proc = launch_pretrain(0, common)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"
    stopped = [m for m in read_metrics(tmp_path) if m.get("event") == "stopped"]
    assert stopped[0]["checkpoint"].endswith("checkpoints/step00000002")
    assert "[dbot] step 2/4 stage=1 loss=" in proc.tail and "\r" not in proc.tail
    proc = launch_pretrain(0, common)                                    # the same command: the next 2 steps
    assert "at step 2 (stage 1)" in proc.tail and "done: step 4/4" in proc.tail
