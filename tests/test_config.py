"""Config loading, overrides, type checks, unknown keys, batch arithmetic, DeepSpeed JSON ownership."""
import json

import pytest
import yaml

from dbot_ds.config import ConfigError, grad_accum_steps, load_config, dump_config

BASE = ["schedule.stage_steps=[2,2]"]


def test_presets_resolve_architectures_and_overrides_win():
    cfg = load_config(preset="vit_h", overrides=["model.img_size=448", "optim.micro_batch=64"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.patch_size, cfg.model.img_size) == (1280, 32, 14, 448)
    assert cfg.optim.micro_batch == 64 and cfg.optim.global_batch == 4096 and cfg.model.drop_path == 0.3
    custom = load_config(overrides=BASE + ["model.arch=vit_base_patch16", "model.depth=6"])
    assert custom.model.embed_dim == 768 and custom.model.depth == 6


def test_unknown_keys_name_close_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.micro_bach'.*optim.micro_batch"):
        load_config(overrides=BASE + ["optim.micro_bach=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lr'.*optim.blr"):
        load_config(overrides=BASE + ["optimizer.lr=4"])
    with pytest.raises(ConfigError, match=r"unknown model.arch 'vit_huge_patch16'.*vit_huge_patch14"):
        load_config(overrides=BASE + ["model.arch=vit_huge_patch16"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="vit_x")


def test_type_checks():
    with pytest.raises(ConfigError, match="'optim.micro_batch' expects int, got 'abc'"):
        load_config(overrides=BASE + ["optim.micro_batch=abc"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(overrides=BASE + ["optim.micro_batch=2.5"])
    with pytest.raises(ConfigError, match="expects bool"):
        load_config(overrides=BASE + ["run.tensorboard=maybe"])
    cfg = load_config(overrides=["schedule.stage_steps=[3, 4]", "optim.blr=1e-3", "run.tensorboard=true"])
    assert cfg.schedule.stage_steps == [3, 4] and cfg.optim.blr == 1e-3 and cfg.run.tensorboard is True


def test_validation_errors():
    with pytest.raises(ConfigError, match="exactly one of schedule.stage_epochs"):
        load_config(overrides=["schedule.stage_steps=[2]", "schedule.stage_epochs=[1]"])
    with pytest.raises(ConfigError, match="teacher.placement"):
        load_config(overrides=BASE + ["teacher.placement=sharded"])
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        load_config(overrides=BASE + ["model.img_size=30"])
    with pytest.raises(ConfigError, match="teacher.init_depth=9"):
        load_config(overrides=BASE + ["teacher.init_depth=9"])


def test_batch_arithmetic():
    cfg = load_config(overrides=BASE + ["optim.global_batch=4096", "optim.micro_batch=128"])
    assert grad_accum_steps(cfg, 32) == 1 and grad_accum_steps(cfg, 8) == 4
    with pytest.raises(ConfigError, match=r"micro_batch \(128\) x accumulation x world size \(24\)"):
        grad_accum_steps(cfg, 24)


def test_config_file_and_dump_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "vit_small_patch8"}, "schedule": {"stage_steps": [5]}}))
    cfg = load_config(path=path, overrides=["run.seed=3"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(path=tmp_path / "out.yaml")
    assert again == cfg and again.model.embed_dim == 192 and again.run.seed == 3
    path.write_text(yaml.safe_dump({"model": {"widht": 3}}))
    with pytest.raises(ConfigError, match="model.widht"):
        load_config(path=path)


def test_deepspeed_json_may_not_restate_project_values(tmp_path):
    from dbot_ds.engine import build_ds_config
    cfg = load_config(overrides=BASE + ["optim.precision=bf16", "optim.global_batch=64", "optim.micro_batch=16", "optim.clip_grad=3"])
    ds = build_ds_config(cfg, 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 16, 2)
    assert ds["gradient_clipping"] == 3.0 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    # DeepSpeed's throughput timer syncs the device twice per micro-step: off unless the JSON asks for it.
    assert ds["timers"] == {"throughput": {"enabled": False}}
    off = build_ds_config(load_config(overrides=BASE + ["optim.precision=bf16", "optim.skip_nonfinite_steps=false"]), 1)
    assert off["bf16"]["check_grad_overflow"] is False
    timed = tmp_path / "timed.json"
    timed.write_text(json.dumps({"zero_optimization": {"stage": 2}, "timers": {"throughput": {"enabled": True}}}))
    assert build_ds_config(load_config(overrides=BASE + ["optim.precision=bf16", f"deepspeed.config={timed}"]), 1)["timers"]["throughput"]["enabled"]
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(load_config(overrides=BASE + ["optim.precision=bf16", f"deepspeed.config={bad}"]), 1)


def test_readme_documents_every_config_key():
    from pathlib import Path
    from dbot_ds.config import _valid_keys
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k in _valid_keys() if f"`{k}`" not in readme]
    assert not missing, f"README's config table lacks {missing}"


def test_accelerate_names_the_deepspeed_json_once(monkeypatch):
    from dbot_ds.engine import DS_CONFIG_DIR as ROOT_DS_CONFIGS, build_ds_config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT_DS_CONFIGS / "zero3.json"))
    assert build_ds_config(load_config(overrides=BASE + ["optim.precision=fp32"]), 1)["zero_optimization"]["stage"] == 3
    assert build_ds_config(load_config(overrides=BASE + ["optim.precision=fp32", "deepspeed.config=zero3"]), 1)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="differs from the deepspeed_config_file"):
        build_ds_config(load_config(overrides=BASE + ["optim.precision=fp32", "deepspeed.config=zero2"]), 1)


def test_a_key_given_twice_is_an_error_that_mentions_quoting():
    with pytest.raises(ConfigError, match="data.shards is given twice.*quote it"):
        load_config(overrides=BASE + ["data.shards=/x/shard-000000.tar", "data.shards=/x/shard-000001.tar"])


def test_steps_on_the_command_line_replace_the_presets_epochs():
    cfg = load_config(preset="demo", overrides=["schedule.stage_steps=[4,4]"])
    s = cfg.schedule
    assert (s.stage_steps, s.stage_epochs, s.warmup_epochs, s.warmup_steps) == ([4, 4], [], 0.0, 0)
    cfg = load_config(preset="demo", overrides=["schedule.stage_steps=[4,4]", "schedule.warmup_steps=1"])
    assert (cfg.schedule.warmup_steps, cfg.schedule.warmup_epochs) == (1, 0.0)
    back = load_config(preset="demo", overrides=["schedule.stage_epochs=[1,1]"])     # the warmup stays in epochs
    assert (back.schedule.stage_epochs, back.schedule.warmup_epochs) == ([1.0, 1.0], 0.5)
    with pytest.raises(ConfigError, match="exactly one"):             # both forms at once is still an error
        load_config(preset="demo", overrides=["schedule.stage_steps=[4]", "schedule.stage_epochs=[1]"])


def test_help_lists_every_preset_without_importing_deepspeed():
    import subprocess
    import sys
    code = ("import sys, dbot_ds.pretrain as p\n"
            "try: p.parse_args(['--help'])\nexcept SystemExit: pass\n"
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("demo", "vit_b", "vit_l", "vit_h", "vit_h_clip"):
        assert name in proc.stdout
    assert proc.stdout.count("all stages and teacher swaps in one run") == 1
    assert "--preset vit_h \\\n        data.shards=" in proc.stdout


def test_a_batch_that_does_not_divide_lists_micro_batches_that_work():
    with pytest.raises(ConfigError, match=r"Set optim.micro_batch to one of \[.*16, 32, 64\]"):
        load_config(overrides=BASE + ["optim.global_batch=64", "optim.micro_batch=24"])
    with pytest.raises(ConfigError, match=r"one of \[.*4, 8, 16\]"):
        grad_accum_steps(load_config(overrides=BASE + ["optim.global_batch=64", "optim.micro_batch=32"]), 4)
