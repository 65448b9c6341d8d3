"""Real launches through the files in launch/: the deepspeed launcher over its default pdsh + ssh path to a
hostfile of two loopback "nodes", and `accelerate launch` with launch/accelerate/cpu_2proc.yaml. Both run the demo
preset through a stage switch on 2 ranks and check the run folder, not just the exit code.

The multi-node test needs sshd and pdsh: they are installed with apt-get when missing (Debian, root) and the test
fails, naming what is missing, when that is impossible. See tests/sshd_loopback.py for the ssh setup."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, _env, free_port, read_metrics, run
from sshd_loopback import LoopbackSshd, ensure_packages

LAUNCH = ROOT / "launch"
STEPS = [3, 3]
# Two short stages on 2 ranks x micro 8, a metrics record every step, checkpoints only at the stage ends.
RUN = TINY + [f"schedule.stage_steps=[{STEPS[0]},{STEPS[1]}]", "schedule.warmup_steps=1", "run.log_every=1",
              "run.save_every=100"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    try:
        ensure_packages()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    with LoopbackSshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def _launcher() -> list[str]:
    exe = shutil.which("deepspeed")
    return [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _check_run(out: Path, world: int = 2) -> None:
    """metrics of both stages and the switch, COMPLETE records, final weights finite and trained past the swap."""
    metrics = read_metrics(out)
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == list(range(1, sum(STEPS) + 1))
    assert {m["stage"] for m in losses} == {0, 1}
    assert all(math.isfinite(m["loss"]) for m in losses)
    for m in losses:                                           # the per-GPU rate is divided by the real world size
        assert m["img_per_s_per_gpu"] == pytest.approx(m["img_per_s"] / world)
    switches = [m for m in metrics if m.get("event") == "stage_switch"]
    assert [s["step"] for s in switches] == [STEPS[0]]

    ckpts = out / "checkpoints"
    swap, final = f"step{STEPS[0]:08d}", f"step{sum(STEPS):08d}"
    assert (ckpts / "latest").read_text() == final
    meta = json.loads((ckpts / final / "COMPLETE").read_text())
    assert meta["step"] == sum(STEPS) and meta["stage_end"]
    assert meta["client_state"]["world_size"] == world
    assert meta["client_state"]["zero_stage"] == 2
    # ZeRO-2: every rank wrote its own optimizer partition.
    for r in range(world):
        assert list((ckpts / final).glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")), sorted(
            p.name for p in (ckpts / final).iterdir())

    import torch
    load = lambda tag: torch.load(ckpts / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                                  weights_only=False)["module"]
    reinit, trained = load(swap), load(final)        # the stage-end checkpoint is taken after the re-init
    assert trained.keys() == reinit.keys() and trained
    assert all(torch.isfinite(t.float()).all() for t in trained.values())
    # Every weight matrix moved in stage 1 (LayerNorm gains at 1.0 can stay put: an update of ~lr is below bf16's
    # resolution there).
    matrices = [k for k, t in trained.items() if t.dim() >= 2]
    assert matrices and all(not torch.equal(trained[k], reinit[k]) for k in matrices)
    teacher = torch.load(ckpts / final / "teacher.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(t.float()).all() for t in teacher["state"].values())


@pytest.mark.slow
def test_deepspeed_hostfile_two_nodes_over_pdsh_ssh(tmp_path, shards, sshd):
    """`deepspeed --hostfile` with `localhost slots=1` and `127.0.0.1 slots=1`: the launcher checks ssh to the
    first host, then pdsh starts deepspeed.launcher.launch on both "nodes" (node ranks 0 and 1) through sshd."""
    cwd = tmp_path / "launch_dir"                 # the launcher's cwd: .deepspeed_env and the hostfile live here
    cwd.mkdir()
    (cwd / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # The remote shells start from sshd's environment; forward what this python and the ranks need.
    # (PYTHONPATH, with the repo, is forwarded by the launcher itself: it exports every PYTHON* variable.)
    env = sshd.env(_env())
    (cwd / ".deepspeed_env").write_text(f"PATH={os.environ['PATH']}\nOMP_NUM_THREADS=1\n")
    out = tmp_path / "run"
    cmd = _launcher() + ["--hostfile", "hostfile", "--ssh_port", str(sshd.port), "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port()), "--module", "dbot_ds.pretrain", "--preset", "demo",
                         *RUN, f"data.shards={shards}", f"run.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    text = proc.stdout + proc.stderr
    assert "pdsh -S" in text and "-w localhost,127.0.0.1" in text, tail       # the multi-node (pdsh) path ran
    # Each host's output comes back prefixed by pdsh with its name: one launcher per node, node ranks 0 and 1.
    ranks = dict(re.findall(r"^(localhost|127\.0\.0\.1): .*nnodes=2, num_local_procs=1, node_rank=(\d)", text, re.M))
    assert sorted(ranks.values()) == ["0", "1"] and set(ranks) == {"localhost", "127.0.0.1"}, tail
    assert re.search(r"^localhost: .*\[dbot\] done: step 6/6", text, re.M), tail
    _check_run(out)


@pytest.mark.slow
def test_accelerate_launch_cpu_2proc(tmp_path, shards):
    """`accelerate launch --config_file launch/accelerate/cpu_2proc.yaml -m dbot_ds.pretrain` from the repo root."""
    cfg = yaml.safe_load((LAUNCH / "accelerate" / "cpu_2proc.yaml").read_text())
    assert cfg["num_processes"] == 2
    exe = shutil.which("accelerate")
    launch = [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
    out = tmp_path / "run"
    ds_env = ROOT / ".deepspeed_env"            # accelerate appends to it for multi-machine configs only
    ds_env_before = ds_env.read_bytes() if ds_env.exists() else None
    proc = run(launch + ["--config_file", "launch/accelerate/cpu_2proc.yaml", "-m", "dbot_ds.pretrain",
                         "--preset", "demo", *RUN, f"data.shards={shards}", f"run.out_dir={out}"])
    assert proc.returncode == 0, proc.tail
    _check_run(out)
    assert (ds_env.read_bytes() if ds_env.exists() else None) == ds_env_before


@pytest.mark.parametrize("name", ["one_gpu", "node8_zero2", "node8_zero3_offload", "cpu_2proc"])
def test_accelerate_configs_accepted(name, monkeypatch):
    """Each accelerate config passes `accelerate launch`'s own checks, and accelerate's DeepSpeed plugin, built
    from the environment the launch sets (from the repo root), accepts it; the JSON it names is one our trainer
    accepts (no batch/precision keys)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from dbot_ds.distributed.engine import load_ds_json, zero_stage

    path = f"launch/accelerate/{name}.yaml"
    cfg = yaml.safe_load((ROOT / path).read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in cfg
    ds_file = cfg["deepspeed_config"]["deepspeed_config_file"]
    assert not os.path.isabs(ds_file) and (ROOT / ds_file).is_file()

    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(["--config_file", path, "-m", "dbot_ds.pretrain"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(
        list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
    _, env = prepare_deepspeed_cmd_env(args)
    assert int(args.nproc_per_node) == cfg["num_processes"]
    for k, v in env.items():
        if k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    plugin = DeepSpeedPlugin()                                  # raises on conflicting settings
    ours = load_ds_json(str(ROOT / ds_file))
    assert plugin.zero_stage == zero_stage(ours)


def test_deepspeed_env_example_parses():
    """Installed as documented (comments and blank lines dropped), every line is NAME=value as DeepSpeed reads it."""
    lines = (LAUNCH / "deepspeed_env.example").read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    names = [ln.split("=", 1)[0] for ln in kept]
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*", n) for n in names), kept
    assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "PYTHONPATH", "OMP_NUM_THREADS"} <= set(names)
    assert len(set(names)) == len(names)
    from deepspeed.launcher.multinode_runner import PDSHRunner
    runner = PDSHRunner.__new__(PDSHRunner)
    runner.exports = {}
    for ln in kept:                                                        # the launcher's own parsing
        key, val = ln.split("=", maxsplit=1)
        runner.add_export(key, val)
    assert runner.exports["NCCL_DEBUG"] == "WARN"


def test_slurm_sbatch_writes_hostfile(tmp_path):
    """The sbatch script turns the allocation into a hostfile (first node = master) and runs the same deepspeed
    command as vit_h_32xa100.sh. `scontrol` and `deepspeed` are stand-ins here: no SLURM on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-04]" ] || exit 9\n'
                                      'printf "gpu01\\ngpu02\\ngpu03\\ngpu04\\n"\n')
    (bin_dir / "deepspeed").write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[01-04]",
               SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(ROOT), SHARDS="/data/shard-{000000..000009}.tar",
               OUT="/ckpt/x", HOSTFILE=str(hostfile))
    proc = subprocess.run(["bash", str(LAUNCH / "slurm_vit_h.sbatch"), "optim.micro_batch=64"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hostfile.read_text().splitlines() == [f"gpu0{i} slots=8" for i in range(1, 5)]
    args = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ARG ")]
    assert args == ["--hostfile", str(hostfile), "--master_addr", "gpu01", "--master_port", "29500", "--module",
                    "dbot_ds.pretrain", "--preset", "vit_h", "--resume", "auto",
                    "data.shards=/data/shard-{000000..000009}.tar", "run.out_dir=/ckpt/x", "optim.micro_batch=64"]
