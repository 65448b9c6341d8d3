"""What `data.shards` resolves to, and that nothing is ever written into a user's folder (no DeepSpeed needed)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dbot_ds.config import ConfigError, load_config
from dbot_ds.dataset import COUNTS_FILE, resolve_dataset
from dbot_ds.pretrain import cli
from dbot_ds.shards import MANIFEST, count_tar_samples, write_synthetic_shards


def cfg(**data):
    return load_config(overrides=["schedule.stage_steps=[2]"] + [f"data.{k}={v}" for k, v in data.items()])


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def user_shards(tmp_path, shards) -> Path:
    """A user's folder of shards written by another tool: tars and a README, no manifest.json."""
    folder = tmp_path / "user"
    folder.mkdir()
    for tar in sorted(Path(shards).glob("*.tar")):
        shutil.copy(tar, folder / tar.name.replace("shard-", "train-"))
    (folder / "README.txt").write_text("my data")
    return folder


def test_count_tar_samples_matches_the_manifest(shards):
    manifest = json.loads((Path(shards) / MANIFEST).read_text())
    for entry in manifest["shards"]:
        assert count_tar_samples(Path(shards) / entry["name"]) == entry["num_samples"]


def test_manifest_folder(shards, tmp_path):
    d = resolve_dataset(cfg(shards=shards), 0, tmp_path / "run")
    assert (d.num_shards, d.num_samples, d.manifest) == (4, 256, None)
    assert d.pattern.endswith("shard-{000000..000003}.tar") and "manifest.json" in d.source


@pytest.mark.parametrize("synthetic_num", [0, 512])
def test_folder_of_shards_without_manifest_is_read_not_filled(user_shards, tmp_path, synthetic_num):
    """The demo's synthetic_num never writes into a folder that holds files; its shards are counted instead,
    and the counts are cached in the run folder."""
    before = snapshot(user_shards)
    run = tmp_path / "run"
    d = resolve_dataset(cfg(shards=user_shards, synthetic_num=synthetic_num), 0, run)
    assert snapshot(user_shards) == before
    assert (d.num_shards, d.num_samples) == (4, 256)
    assert d.manifest == str(run / COUNTS_FILE) and "tar headers" in d.source
    assert d.pattern.split("::")[0].endswith("train-000000.tar")
    again = resolve_dataset(cfg(shards=user_shards, resampled="false"), 0, run)   # cached; exact-epoch counts
    assert again.num_samples == 256


def test_folder_without_shards_is_refused_and_untouched(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="without manifest.json and without .tar shards"):
        resolve_dataset(cfg(shards=folder, synthetic_num=64), 0, tmp_path / "run")
    assert [p.name for p in folder.iterdir()] == ["a.jpg"]


def test_synthetic_data_only_into_a_new_or_empty_folder(tmp_path):
    target = tmp_path / "demo_shards"
    (tmp_path / "demo_shards.partial-1").mkdir()                  # a killed generation's leftovers
    d = resolve_dataset(cfg(shards=target, synthetic_num=64), 0, tmp_path / "run")
    assert d.num_samples == 64 and (target / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_shards"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_dataset(cfg(shards=empty, synthetic_num=32), 0, tmp_path / "run").num_samples == 32
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_dataset(cfg(shards=tmp_path / "nowhere"), 0, tmp_path / "run")


def test_sizes_and_their_source(shards, tmp_path):
    pattern = f"{shards}/shard-{{000000..000001}}.tar"
    assert resolve_dataset(cfg(shards=pattern), 0, tmp_path).num_samples == 128
    d = resolve_dataset(cfg(shards=pattern, num_samples=1000), 0, tmp_path)
    assert (d.num_samples, d.source) == (1000, "data.num_samples")
    with pytest.raises(ConfigError, match="data.num_samples=1000 but the shards hold 128"):
        resolve_dataset(cfg(shards=pattern, num_samples=1000, resampled="false"), 0, tmp_path)
    with pytest.raises(ConfigError, match="data.shards is empty.*--preset demo"):
        resolve_dataset(cfg(), 0, tmp_path)


def test_no_preset_no_config_no_shards_is_an_error_not_the_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli([]) == 2
    err = capsys.readouterr().err
    assert "no --preset, --config or data.shards given" in err and "--preset demo" in err
    assert list(tmp_path.iterdir()) == []                      # no data/, no runs/


def test_dbot_shards_manifest_command(user_shards):
    from dbot_ds.shards import cli as shards_cli
    assert shards_cli(["manifest", str(user_shards)]) == 0
    manifest = json.loads((user_shards / MANIFEST).read_text())
    assert manifest["num_samples"] == 256 and manifest["shards"][0]["name"] == "train-000000.tar"


def test_write_synthetic_is_counted_like_the_loader(tmp_path):
    write_synthetic_shards(tmp_path, 10, img_size=16, per_shard=4)
    assert [count_tar_samples(p) for p in sorted(tmp_path.glob("*.tar"))] == [4, 4, 2]
