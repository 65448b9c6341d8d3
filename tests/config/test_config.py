"""Config loading, overrides, type checks, unknown keys, batch arithmetic, DeepSpeed JSON ownership."""
import json

import pytest
import yaml

from dbot_ds.config import ConfigError, dump_config, grad_accum_steps, load_config

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
    from dbot_ds.distributed.engine import build_ds_config
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


def test_docs_config_md_documents_every_key_and_its_default():
    """docs/config.md's tables (one per section, `| key | default | meaning |`) list exactly the dataclass fields,
    each default written as the YAML literal of the dataclass default, so the page cannot drift from the code."""
    import dataclasses
    import re
    from pathlib import Path

    from dbot_ds.config import Config, _valid_keys

    def yaml_literal(value) -> str:
        """The one way the page writes a default: true/false, "" for an empty string, other strings unquoted, lists
        in flow style, floats with a decimal point and, below 0.001, in exponent form (1.5e-4, 1.0e-8)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return value or '""'
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            if value and abs(value) < 1e-3:
                mantissa, exponent = f"{value:.15e}".split("e")
                mantissa = mantissa.rstrip("0")
                return f"{mantissa}{'0' if mantissa.endswith('.') else ''}e{int(exponent)}"
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(yaml_literal(v) for v in value) + "]"
        raise TypeError(f"no YAML literal for {value!r}")

    page = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    tables = re.findall(r"^## (\w+)\n(?:(?!## |\| key).*\n)*(\| key \| default \| meaning \|\n\|---\|---\|---\|\n(?:\|.*\n)+)",
                        page, flags=re.M)
    assert [s for s, _ in tables] == [f.name for f in dataclasses.fields(Config)], "one table per section, in order"
    documented: dict[str, str] = {}
    for section, table in tables:
        for row in table.splitlines()[2:]:
            cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
            assert len(cells) == 3 and all(cells), f"docs/config.md: a row needs key, default and meaning: {row}"
            key, default = re.fullmatch(r"`([\w.]+)`", cells[0]), re.fullmatch(r"`(.*)`", cells[1])
            assert key and default, f"docs/config.md: key and default go in backticks: {row}"
            assert key[1].split(".")[0] == section, f"docs/config.md: {key[1]} is in the table of section '{section}'"
            assert key[1] not in documented, f"docs/config.md documents {key[1]} twice"
            documented[key[1]] = default[1]
    keys = set(_valid_keys())
    assert not keys - documented.keys(), f"docs/config.md lacks {sorted(keys - documented.keys())}"
    assert not documented.keys() - keys, f"docs/config.md documents unknown keys {sorted(documented.keys() - keys)}"
    cfg = Config()
    for key, text in documented.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert text == yaml_literal(value), f"docs/config.md: {key} default `{text}`, the dataclass's `{yaml_literal(value)}`"
        loaded = yaml.safe_load(text)
        assert loaded == value and type(loaded) is type(value), f"docs/config.md: `{text}` loads as {loaded!r}"


def test_accelerate_names_the_deepspeed_json_once(monkeypatch):
    from dbot_ds.distributed.engine import DS_CONFIG_DIR as ROOT_DS_CONFIGS
    from dbot_ds.distributed.engine import build_ds_config
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
