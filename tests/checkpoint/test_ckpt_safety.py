"""A checkpoint never runs code (dbot_ds/ckpt_safety.py): crafted files made from a real checkpoint are refused by
--resume auto, --resume PATH and dbot-export before anything is unpickled, and a marker file proves that no code
ran; files that changed since the save are named from the sizes and SHA-256 in COMPLETE."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, launch_pretrain, run, torchrun_cmd

from dbot_ds.checkpoint import safety as ckpt_safety

pytestmark = pytest.mark.slow       # every test here starts real processes or trains a run

TAG = "step00000002"                   # stage 0's end (teacher.pt of depth 4); the run goes on to step 4
MODEL, TEACHER = "mp_rank_00_model_states.pt", "teacher.pt"
OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


def common(shards: str, out: Path) -> list[str]:
    return TINY + [f"data.shards={shards}", f"run.out_dir={out}", "schedule.stage_steps=[2,2]",
                   "schedule.warmup_steps=1", "optim.micro_batch=16", "run.save_every=100",
                   "optim.precision=bf16"]     # the subject: the files DeepSpeed writes for a bf16 run (GPU recipes)


@pytest.fixture(scope="module")
def saved_run(shards, tmp_path_factory) -> Path:
    """A 1-process run (ZeRO-2, bf16) stopped at its stage-0 end: one complete checkpoint, made once."""
    out = tmp_path_factory.mktemp("safety_run")
    launch_pretrain(0, common(shards, out) + ["run.stop_after_steps=2"])
    return out


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    """A private copy of the saved run to tamper with."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


class RunsCommand:
    """Pickles as `os.system(command)`: what an attacker adds to a checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def inject(path: Path, obj, key: str = "extra") -> None:
    """Add one pickled object to a torch file, as an attacker with the file would."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    blob[key] = obj
    torch.save(blob, path)


def rerecord(tag_dir: Path) -> None:
    """Rewrite COMPLETE's sizes and SHA-256 to match the files, so the pickle scan, not the hash, must catch it."""
    assert ckpt_safety.main(["record", str(tag_dir)]) == 0


def poison(tag_dir: Path, name: str, marker: Path) -> None:
    inject(tag_dir / name, RunsCommand(f"touch {marker}"))
    rerecord(tag_dir)


def export_cli(capsys, *args) -> tuple[int, str]:
    from dbot_ds.checkpoint.export_cli import cli
    capsys.readouterr()
    rc = cli([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def assert_refused(text: str, name: str, why: str) -> None:
    """One clean line naming the file and the cause, with the fix; no traceback."""
    line = next(ln for ln in text.splitlines() if "refused" in ln)
    assert name in line and why in line, line
    assert "Traceback" not in text, text[-3000:]


# ----------------------------------------------------------------------------------------------------------
# The allow-list and the scanner on their own


def test_allowlist_is_what_deepspeed_writes(saved_run):
    """Every global beyond torch's own in a fresh checkpoint is allow-listed, and each allowed name is a real
    DeepSpeed object (a DeepSpeed upgrade that moves one shows up here, not as refused user checkpoints)."""
    import importlib
    tag_dir = saved_run / "checkpoints" / TAG
    found = set()
    for f in tag_dir.glob("*.pt"):
        found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
    assert found == set(ckpt_safety.DEEPSPEED_GLOBALS)           # ZeRO-2 bf16 holds all three
    for name in ckpt_safety.DEEPSPEED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), attr), type), name
    assert all(ckpt_safety.scan_file(f) is None for f in tag_dir.glob("*.pt"))


def test_crafted_file_would_run_code_and_the_scan_does_not(run_copy, tmp_path):
    """Control: the crafted file really runs its command under a full unpickle; the scan names the global and
    runs nothing."""
    tag_dir, marker = run_copy / "checkpoints" / TAG, tmp_path / "MARKER"
    poison(tag_dir, MODEL, marker)
    assert ckpt_safety.scan_file(tag_dir / MODEL) == ("unsafe", f"{MODEL} holds the pickle global posix.system")
    assert not marker.exists()
    torch.load(tag_dir / MODEL, weights_only=False)
    assert marker.exists()


def test_saved_record_matches_the_files(saved_run):
    meta = json.loads((saved_run / "checkpoints" / TAG / "COMPLETE").read_text())
    tag_dir = saved_run / "checkpoints" / TAG
    assert sorted(meta["files"]) == sorted([MODEL, OPTIM, TEACHER])
    for name, rec in meta["files"].items():
        assert rec == {"size": (tag_dir / name).stat().st_size, "sha256": ckpt_safety.sha256_file(tag_dir / name)}


# ----------------------------------------------------------------------------------------------------------
# dbot-pretrain: --resume auto / PATH


def test_malicious_model_states_refused_by_resume_auto(run_copy, shards, tmp_path):
    marker = tmp_path / "MARKER"
    poison(run_copy / "checkpoints" / TAG, MODEL, marker)
    proc = launch_pretrain(0, common(shards, run_copy), expect_rc=2)
    assert_refused(proc.tail, MODEL, "posix.system")
    assert "--trust-checkpoint" in proc.tail
    assert not marker.exists()


def test_malicious_optimizer_states_refused_by_resume_path(run_copy, shards, tmp_path):
    marker = tmp_path / "MARKER"
    poison(run_copy / "checkpoints" / TAG, OPTIM, marker)
    proc = launch_pretrain(0, common(shards, tmp_path / "fresh") + ["--resume", str(run_copy / "checkpoints" / TAG)],
                           expect_rc=2)
    assert_refused(proc.tail, OPTIM, "posix.system")
    assert not marker.exists()


def test_malicious_teacher_refused(run_copy, shards, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    poison(run_copy / "checkpoints" / TAG, TEACHER, marker)
    proc = launch_pretrain(0, common(shards, run_copy), expect_rc=2)
    assert_refused(proc.tail, TEACHER, "posix.system")
    # The loader itself, should anything reach it unscanned: one line naming the file, the cause and the fix.
    with pytest.raises(ckpt_safety.CheckpointRefused, match=r"teacher\.pt was refused .*posix\.system.*Restore it"):
        ckpt_safety.load_teacher_file(run_copy / "checkpoints" / TAG / TEACHER)
    assert not marker.exists()


def test_truncated_shard_is_named(run_copy, shards):
    path = run_copy / "checkpoints" / TAG / OPTIM
    size = path.stat().st_size
    os.truncate(path, size // 2)
    proc = launch_pretrain(0, common(shards, run_copy), expect_rc=2)
    assert_refused(proc.tail, f"{OPTIM} is {size // 2} bytes, {size} when saved", "truncated")


def test_changed_missing_and_added_files_are_named(run_copy):
    """Same size, other bytes; a file gone; a file that was not saved: each named, with the way out."""
    tag_dir = run_copy / "checkpoints" / TAG
    data = bytearray((tag_dir / TEACHER).read_bytes())
    data[-100] ^= 0xFF
    (tag_dir / TEACHER).write_bytes(bytes(data))
    (tag_dir / MODEL).unlink()
    (tag_dir / "notes.pt").write_bytes(b"x")
    with pytest.raises(ckpt_safety.CheckpointRefused) as e:
        ckpt_safety.verify_tag(tag_dir)
    msg = str(e.value)
    assert f"{TEACHER} differs from its SHA-256 recorded at save" in msg
    assert f"{MODEL} is missing" in msg and "notes.pt was not part of the checkpoint" in msg
    assert "python -m dbot_ds.checkpoint.safety record" in msg and "\n" not in msg


def test_trust_checkpoint_loads_a_harmless_extra_global(run_copy, shards):
    """argparse.Namespace (what DeepSpeed stores as `args` for other projects) is refused by default and
    loaded with --trust-checkpoint; a changed file stays an error even then."""
    tag_dir = run_copy / "checkpoints" / TAG
    inject(tag_dir / MODEL, argparse.Namespace(lr=0.1))
    rerecord(tag_dir)
    proc = launch_pretrain(0, common(shards, run_copy), expect_rc=2)
    assert_refused(proc.tail, MODEL, "argparse.Namespace")
    proc = launch_pretrain(0, common(shards, run_copy) + ["--trust-checkpoint"])
    assert "resumed from" in proc.tail and "done: step 4/4" in proc.tail

    os.truncate(tag_dir / OPTIM, 100)
    with pytest.raises(ckpt_safety.CheckpointRefused, match="100 bytes"):
        ckpt_safety.verify_tag(tag_dir, trust=True)


def test_checkpoint_without_record_warns_and_is_still_scanned(run_copy, shards, tmp_path):
    """Checkpoints saved before the record: accepted with a warning, but the pickle scan still runs."""
    tag_dir = run_copy / "checkpoints" / TAG
    meta = json.loads((tag_dir / "COMPLETE").read_text())
    del meta["files"]
    (tag_dir / "COMPLETE").write_text(json.dumps(meta))
    ckpt_safety.verify_tag(tag_dir)                           # clean: passes
    marker = tmp_path / "MARKER"
    inject(tag_dir / OPTIM, RunsCommand(f"touch {marker}"))
    proc = launch_pretrain(0, common(shards, run_copy), expect_rc=2)
    assert "lists no file sizes or SHA-256" in proc.tail
    assert_refused(proc.tail, OPTIM, "posix.system")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# dbot-export


def test_export_refuses_malicious_and_truncated_files(run_copy, tmp_path, capsys):
    tag_dir, marker = run_copy / "checkpoints" / TAG, tmp_path / "MARKER"
    poison(tag_dir, OPTIM, marker)
    for which in ("student", "teacher"):
        rc, out = export_cli(capsys, run_copy, "--out", tmp_path / "e", "--which", which)
        assert rc == 2
        assert_refused(out, OPTIM, "posix.system")
    assert not marker.exists() and not (tmp_path / "e").exists()
    size = (tag_dir / TEACHER).stat().st_size
    os.truncate(tag_dir / TEACHER, 1000)
    rc, out = export_cli(capsys, tag_dir, "--out", tmp_path / "e", "--which", "teacher", "--trust-checkpoint")
    assert rc == 2
    assert_refused(out, f"{TEACHER} is 1000 bytes, {size} when saved", "truncated")


def test_export_trust_checkpoint(run_copy, tmp_path, capsys):
    tag_dir = run_copy / "checkpoints" / TAG
    inject(tag_dir / TEACHER, argparse.Namespace(note="from elsewhere"))
    rerecord(tag_dir)
    rc, out = export_cli(capsys, tag_dir, "--out", tmp_path / "e", "--which", "teacher")
    assert rc == 2 and "argparse.Namespace" in out
    rc, out = export_cli(capsys, tag_dir, "--out", tmp_path / "e", "--which", "teacher", "--trust-checkpoint")
    assert rc == 0, out
    assert (tmp_path / "e" / "encoder.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------
# 2 processes: the file one rank checks fails every rank, none hangs


def test_two_ranks_refuse_a_file_only_rank_1_checks(shards, tmp_path):
    out, marker = tmp_path / "run2", tmp_path / "MARKER"
    args = common(shards, out) + ["optim.micro_batch=8"]
    launch_pretrain(2, args + ["run.stop_after_steps=2"])
    tag_dir = out / "checkpoints" / TAG
    files = json.loads((tag_dir / "COMPLETE").read_text())["files"]
    shard1 = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"          # hashed by rank 1 at save
    assert files[shard1]["sha256"] == ckpt_safety.sha256_file(tag_dir / shard1) and len(files) == 4
    poison(tag_dir, shard1, marker)
    t0 = time.time()
    proc = run(torchrun_cmd(2) + ["-m", "dbot_ds.pretrain", "--preset", "demo"] + args, timeout=120)
    assert proc.returncode == 2, proc.tail
    assert_refused(proc.tail, shard1, "posix.system")
    assert time.time() - t0 < 100 and not marker.exists()
