"""optim.precision=auto: bf16 only where the device runs it natively, said on the start line, recorded in the run's
config and checkpoints, and kept by a resume on a machine where auto would choose otherwise.
DBOT_CPU_BF16 stands in for the other kind of CPU (AVX2 only, or one with AVX512-BF16 / AMX)."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml
from conftest import TINY, run
from testkit import resume_check

from dbot_ds.config import ConfigError, load_config
from dbot_ds.train import precision

CPU = torch.device("cpu")


def test_auto_on_a_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    choice = precision.choose("auto", CPU)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and choice.warning is None
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.choose("auto", CPU).precision == "bf16"


def test_explicit_values_win_and_emulated_bf16_warns_once_with_the_slowdown(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    bf16 = precision.choose("bf16", CPU)
    assert bf16.precision == "bf16" and bf16.reason == "set by optim.precision"
    assert "emulates" in bf16.warning and "20x slower" in bf16.warning
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.choose("bf16", CPU).warning is None
    assert precision.choose("fp32", CPU) == ("fp32", "set by optim.precision", None)


def test_onednn_capped_below_bf16_counts_as_emulated(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, what = precision.cpu_bf16()
    assert not native and "ONEDNN_MAX_CPU_ISA=AVX2" in what
    assert precision.choose("auto", CPU).precision == "fp32"


def test_detection_without_the_override_matches_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native, what = precision.cpu_bf16()
    assert native == bool({"avx512_bf16", "amx_bf16"} & precision._cpuinfo_flags())
    assert what


def test_resume_with_auto_keeps_the_checkpoints_precision(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    here = precision.choose("auto", CPU)
    kept = precision.for_resume("auto", here, "bf16", "step00000004", CPU)
    assert kept.precision == "bf16" and "step00000004 was trained in bf16" in kept.reason
    assert "would choose fp32" in kept.reason and "20x slower" in kept.warning
    assert precision.for_resume("fp32", here, "bf16", "step00000004", CPU) is here   # the resume check refuses it
    assert precision.for_resume("auto", here, "fp32", "step00000004", CPU) is here


def test_config_default_presets_and_errors():
    assert load_config(overrides=["schedule.stage_steps=[1]"]).optim.precision == "auto"
    assert load_config(preset="demo").optim.precision == "auto"
    assert {load_config(preset=p).optim.precision for p in ("vit_b", "vit_l", "vit_h", "vit_h_clip")} == {"bf16"}
    with pytest.raises(ConfigError, match="optim.precision must be 'auto', 'bf16' or 'fp32', got 'fp16'"):
        load_config(preset="demo", overrides=["optim.precision=fp16"])
    with pytest.raises(ValueError, match="must be resolved"):
        from dbot_ds.distributed.engine import build_ds_config
        build_ds_config(load_config(preset="demo"), 1)


def test_an_empty_eval_shards_turns_the_demo_monitor_off():
    e = load_config(preset="demo", overrides=["eval.shards="]).eval
    assert (e.shards, e.synthetic_num, e.query_shards) == ("", 0, "")


@pytest.mark.slow
def test_start_line_config_and_resume_on_a_machine_that_chooses_otherwise(tmp_path, shards, monkeypatch):
    """A run started where auto means fp32 says so, records fp32 and trains 2 steps; resumed where auto would
    mean bf16, it continues in fp32 and says why; an explicit other precision is refused naming both."""
    cmd = [sys.executable, "-m", "dbot_ds.pretrain", "--preset", "demo", "optim.precision=auto"] + TINY + [
        f"data.shards={shards}", f"run.out_dir={tmp_path}", "schedule.stage_steps=[4]", "optim.micro_batch=16",
        "run.stop_after_steps=2"]
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    proc = run(cmd)
    assert proc.returncode == 0, proc.tail
    assert "[dbot] precision: fp32 (auto: this CPU has no native bf16 matmuls (DBOT_CPU_BF16=0)" in proc.stdout
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["precision"] == "fp32"
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    proc = run(cmd)
    assert proc.returncode == 0, proc.tail
    assert "[dbot] precision: fp32 (auto: checkpoint step00000002 was trained in fp32" in proc.stdout
    assert "would choose bf16" in proc.stdout and "at step 2" in proc.tail
    # an explicit bf16 is refused by the start's resume check (asked in this process: no third launch)
    overrides = [a for a in cmd[cmd.index("demo") + 1:] if a != "optim.precision=auto"] + ["optim.precision=bf16"]
    with pytest.raises(ConfigError, match=r"optim.precision: 'fp32' -> 'bf16'.*optim.precision=auto continues"):
        resume_check(tmp_path, overrides)
