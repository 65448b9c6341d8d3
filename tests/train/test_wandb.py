"""Weights & Biases as an optional extra (run.wandb=true, train/wandb_sink.py): the config error without the
package, the offline default without an API key, rank 0 only, a real demo run, stopped and resumed, whose
offline W&B runs (read back with wandb's own reader) hold the scalars of metrics.jsonl under one run id, and an
online start that cannot reach W&B falling back to offline. No network is used."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, launch_pretrain, read_metrics

from dbot_ds.config import ConfigError, load_config

SCALARS = ("loss", "lr", "grad_norm", "img_per_s", "img_per_s_per_gpu", "data_wait_frac", "samples_seen",
           "skipped_samples", "skipped_steps", "stage", "step_in_stage")


@pytest.fixture
def offline_env(tmp_path, monkeypatch) -> Path:
    """No API key anywhere W&B looks (no WANDB_API_KEY, an empty $NETRC), no WANDB_MODE, and W&B's own folders
    under tmp_path; returns WANDB_DIR, which must stay unused (the run folder holds the W&B files)."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT",
                "WANDB_ENTITY", "WANDB_NAME", "WANDB_DISABLED", "WANDB_SILENT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home" / key.lower()))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    return tmp_path / "wandb_dir"


def test_without_the_package_run_wandb_fails_at_once_naming_the_fix(monkeypatch, capsys):
    from dbot_ds import pretrain
    monkeypatch.setitem(sys.modules, "wandb", None)            # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=re.escape("pip install -e '.[wandb]'")):
        load_config(preset="demo", overrides=["run.wandb=true"])
    assert load_config(preset="demo").run.wandb is False      # off by default: nothing imported
    assert pretrain.cli(["--preset", "demo", "run.wandb=true", "run.out_dir=/nonexistent/never_made"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[wandb]'" in err, err
    with pytest.raises(ConfigError, match="run.wandb_project"):
        load_config(preset="demo", overrides=["run.wandb=true", "run.wandb_project="])


def test_offline_unless_an_api_key_is_configured_and_the_users_mode_wins(tmp_path):
    from dbot_ds.train.wandb_sink import api_key_configured, choose_mode
    netrc = tmp_path / "netrc"
    env = {"NETRC": str(netrc)}
    assert not api_key_configured(env) and choose_mode(env)[0] == "offline"        # no file at all
    netrc.write_text("machine example.com login me password secret\n")
    netrc.chmod(0o600)
    assert choose_mode(env)[0] == "offline"                                          # another host's entry
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert api_key_configured(env) and choose_mode(env)[0] == "online"             # `wandb login`
    assert choose_mode({**env, "WANDB_BASE_URL": "https://wandb.mycompany.org"})[0] == "offline"
    assert choose_mode({"NETRC": str(tmp_path / "none"), "WANDB_API_KEY": "k" * 40})[0] == "online"
    assert choose_mode({**env, "WANDB_MODE": "offline"}) == (None, "WANDB_MODE=offline")   # the user's choice wins
    assert choose_mode({"NETRC": str(tmp_path / "none"), "WANDB_MODE": "online"})[0] is None


def test_only_rank_0_starts_a_wandb_run(tmp_path):
    from dbot_ds.train.metrics import MetricsLogger
    cfg = load_config(preset="demo", overrides=[f"run.out_dir={tmp_path}"])
    m = MetricsLogger(tmp_path, 1, 10, 0, progress=False, tensorboard=False, wandb_config=cfg.to_dict())
    m.log({"step": 1, "loss": 1.0})
    m.close()
    assert m.wandb is None and not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()


def read_wandb_run(folder: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline run folder's run-<id>.wandb, read with wandb's own reader: `wandb leet
    inspect --json` (wandb >= 0.31), else the Python record reader of older versions."""
    try:
        from wandb.sdk.internal import datastore
    except ImportError:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows = [(r["type"], r[r["type"]]) for r in records if r.get("type") in ("history", "config")]
        return ([body["item"] for kind, body in rows if kind == "history"],
                {k: v for kind, body in rows if kind == "config" for k, v in body.get("update", {}).items()})
    from wandb.proto import wandb_internal_pb2
    (path,) = folder.glob("run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    history, config = [], {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind in ("history", "config"):
            items = record.history.item if kind == "history" else record.config.update
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            history.append(row) if kind == "history" else config.update(row)
    return history, config


def _start_line(out: str, run_dir: Path) -> tuple[str, Path, str]:
    """(run id, offline folder, what `wandb sync` is told to upload) from the one start line."""
    lines = [line for line in out.splitlines() if line.startswith("[dbot] wandb: ")]
    assert len(lines) == 1, out[-4000:]
    m = re.fullmatch(r"\[dbot\] wandb: offline run (\w+) \(no W&B API key configured.*\) in (\S+); "
                     r"upload it with `wandb sync (\S+)`.*", lines[0])
    assert m, lines[0]
    folder = Path(m[2])
    assert folder.is_dir() and folder.parent == run_dir / "wandb" and folder.name.endswith(f"-{m[1]}"), lines[0]
    return m[1], folder, m[3]


def _at(history: list[dict], key: str) -> dict[int, object]:
    return {row["_step"]: row[key] for row in history if key in row}


@pytest.mark.slow        # two real training processes, each with W&B's own service process
def test_a_demo_run_logs_offline_into_its_folder_and_a_resume_continues_the_same_wandb_run(tmp_path, shards,
                                                                                                offline_env):
    """Stages [3, 3], log every step, the kNN monitor at step 0 and the stage ends; stopped after step 4, then
    resumed to the end."""
    run_dir = tmp_path / "run"
    common = TINY + [f"data.shards={shards}", f"run.out_dir={run_dir}", "schedule.stage_steps=[3,3]",
                     "schedule.warmup_steps=1", "optim.micro_batch=16", "run.log_every=1", "run.save_every=100",
                     f"eval.shards={shards}", "eval.every_steps=0", "eval.k=10",
                     "run.wandb=true", "run.wandb_project=dbot-test", "run.wandb_name=tiny"]
    first = launch_pretrain(0, common + ["run.stop_after_steps=4"])
    run_id, folder, sync = _start_line(first.stdout, run_dir)
    assert sync == str(folder)
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert not offline_env.exists() or not any(offline_env.iterdir()), "W&B wrote outside the run folder"

    history, config = read_wandb_run(folder)
    logs = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    for key in SCALARS:                                 # every scalar of metrics.jsonl, at its step
        assert _at(history, key) == pytest.approx({r["step"]: r[key] for r in logs}), key
    evals = [(r["step"], r["model"], r["knn_top1_mean"]) for r in read_metrics(run_dir) if r.get("event") == "eval"]
    assert [(s, m) for s, m, _ in evals] == [(0, "student"), (3, "student"), (3, "teacher")]
    assert _at(history, "eval/teacher/knn_top1_mean") == pytest.approx({3: evals[2][2]})
    assert set(_at(history, "eval/student/knn_top5_cls")) == {0, 3}
    assert _at(history, "stage_switch/to_stage") == {3: 1} and _at(history, "stage_switch/teacher_depth")
    assert _at(history, "stopped/reason") == {4: "run.stop_after_steps"}
    assert set(_at(history, "checkpoint/tag")) == {3, 4}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())     # the resolved config, as in config.yaml
    for section in ("model", "optim", "schedule", "run"):
        assert config[section] == saved[section], section
    assert config["optim"]["precision"] in ("bf16", "fp32") and config["run"]["wandb_name"] == "tiny"

    second = launch_pretrain(0, common)                 # --resume auto: steps 5-6
    assert "at step 4" in second.stdout + second.stderr
    again, folder2, sync = _start_line(second.stdout, run_dir)
    assert again == run_id and folder2 != folder and (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert sync == str(run_dir / "wandb" / f"offline-run-*-{run_id}") and "its 2 offline parts" in second.stdout
    assert sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}")) == sorted([folder, folder2])
    history2, config2 = read_wandb_run(folder2)
    logs2 = [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > 4]
    assert _at(history2, "loss") == pytest.approx({r["step"]: r["loss"] for r in logs2}) and len(logs2) == 2
    assert _at(history2, "resumed/tag") == {4: str(run_dir / "checkpoints" / "step00000004")}
    assert set(_at(history2, "eval/student/knn_top1_mean")) == {6}
    assert config2["run"]["stop_after_steps"] == 0


FALLBACK = """
import sys
from pathlib import Path
from dbot_ds.config import load_config
from dbot_ds.train.metrics import MetricsLogger
run_dir = Path(sys.argv[1])
cfg = load_config(preset="demo", overrides=[f"run.out_dir={run_dir}", "run.wandb=true"])
m = MetricsLogger(run_dir, 0, 10, 0, progress=False, tensorboard=False, wandb_config=cfg.to_dict())
m.log({"stage": 0, "step": 1, "loss": 0.5, "lr": 1e-3, "img_per_s": 10.0})
m.close()
"""


@pytest.mark.slow        # W&B's service process
def test_an_online_start_that_cannot_reach_wandb_logs_offline_instead(tmp_path, offline_env, monkeypatch):
    """A key is configured, but the W&B host refuses connections (nothing listens on port 9): the run is not
    stopped, it logs offline and says so."""
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", FALLBACK, str(run_dir)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[dbot] warning: W&B online start failed" in proc.stderr, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("[dbot] wandb: ")]
    assert len(line) == 1 and "offline run" in line[0] and "(the online start failed)" in line[0], proc.stdout
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    history, _ = read_wandb_run(folder)
    assert [(r["_step"], r["loss"]) for r in history if "loss" in r] == [(1, 0.5)]
