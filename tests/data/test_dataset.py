"""What `data.shards` resolves to, and that nothing is ever written into a user's folder (no DeepSpeed needed)."""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from dbot_ds.config import ConfigError, load_config
from dbot_ds.data.dataset import COUNTS_FILE, resolve_dataset
from dbot_ds.data.manifest import MANIFEST, count_tar_samples
from dbot_ds.data.synthetic import write_synthetic_shards
from dbot_ds.pretrain import cli


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
    from dbot_ds.data.shards import cli as shards_cli
    assert shards_cli(["manifest", str(user_shards)]) == 0
    manifest = json.loads((user_shards / MANIFEST).read_text())
    assert manifest["num_samples"] == 256 and manifest["shards"][0]["name"] == "train-000000.tar"


def test_write_synthetic_is_counted_like_the_loader(tmp_path):
    write_synthetic_shards(tmp_path, 10, img_size=16, per_shard=4)
    assert [count_tar_samples(p) for p in sorted(tmp_path.glob("*.tar"))] == [4, 4, 2]


@pytest.fixture
def three_good_one_garbage(tmp_path) -> Path:
    """Three generated shards (10 + 10 + 5 samples), no manifest, and shard-000003.tar of random bytes."""
    folder = tmp_path / "mixed"
    write_synthetic_shards(folder, 25, img_size=16, per_shard=10)
    (folder / MANIFEST).unlink()
    (folder / "shard-000003.tar").write_bytes(os.urandom(4096))
    return folder


def test_corrupt_shard_is_skipped_and_named(three_good_one_garbage, tmp_path, capsys):
    bad = three_good_one_garbage / "shard-000003.tar"
    run = tmp_path / "run"
    for _ in range(2):                             # the second start must not find it cached as good
        d = resolve_dataset(cfg(shards=three_good_one_garbage, resampled="false"), 0, run)
        assert (d.num_shards, d.num_samples) == (3, 25)
        assert "shard-000003" not in d.pattern and len(d.pattern.split("::")) == 3
        out = capsys.readouterr().out
        assert f"[dbot] skipped corrupt shard {bad} (tarfile: " in out and "3 of 4 shards used" in out
        assert d.skipped == ((str(bad), d.skipped[0][1]),) and "skipped 1 corrupt shard(s): shard-000003.tar" \
            in d.describe()
        counts = json.loads((run / COUNTS_FILE).read_text())
        assert str(bad) not in counts["files"] and len(counts["files"]) == 3
        assert [e["name"] for e in counts["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]


def test_shard_that_goes_bad_after_it_was_cached_is_recounted(tmp_path, capsys):
    folder = tmp_path / "data"
    write_synthetic_shards(folder, 20, img_size=16, per_shard=10)
    (folder / MANIFEST).unlink()
    run = tmp_path / "run"
    assert resolve_dataset(cfg(shards=folder), 0, run).num_samples == 20
    (folder / "shard-000001.tar").write_bytes(b"")                    # emptied: size and mtime change
    d = resolve_dataset(cfg(shards=folder), 0, run)
    assert (d.num_shards, d.num_samples) == (1, 10) and "shard-000001" not in d.pattern
    assert "skipped corrupt shard" in capsys.readouterr().out


def test_folder_of_only_garbage_is_a_config_error_naming_the_file(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(2):
        (folder / f"shard-00000{i}.tar").write_bytes(os.urandom(2048))
    with pytest.raises(ConfigError, match=f"no readable shard in {re.escape(str(folder))}: .*"
                       f"{re.escape(str(folder / 'shard-000000.tar'))}: tarfile"):
        resolve_dataset(cfg(shards=folder), 0, tmp_path / "run")


def test_truncated_shard_counts_what_the_loader_reads(tmp_path, capsys):
    """A tar cut inside a JPEG keeps its intact samples (and the cut sample's `cls`, read before the JPEG):
    the count is what webdataset's reader with a skipping handler (as in data.py) yields, so the epoch the stage
    plan assumes is the one training reads; it is not cached, so a repaired copy is counted afresh."""
    folder = tmp_path / "data"
    write_synthetic_shards(folder, 20, img_size=16, per_shard=10)
    (folder / MANIFEST).unlink()
    cut = folder / "shard-000001.tar"
    with tarfile.open(cut) as tf:
        jpeg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][6]
    os.truncate(cut, jpeg.offset_data + jpeg.size // 2)
    readable = sum(1 for _ in wds.tarfile_to_samples(handler=lambda e: True)([{"url": str(cut)}]))
    assert readable == 7                           # samples 0-5 whole, sample 6 without its image
    run = tmp_path / "run"
    d = resolve_dataset(cfg(shards=folder, resampled="false"), 0, run)
    assert (d.num_shards, d.num_samples, d.skipped) == (2, 10 + readable, ())
    assert f"shard {cut} is damaged (tarfile: unexpected end of data): counted the 7 samples" in capsys.readouterr().out
    assert str(cut) not in json.loads((run / COUNTS_FILE).read_text())["files"]


def test_imagenet_presets_read_exact_epochs_and_refuse_a_subset_naming_both_ways_out(tmp_path, shards):
    """The published presets use exact epochs (the reference's DistributedSampler); their data.num_samples checks
    that the shards are the whole ImageNet-1K train set."""
    for preset in ("vit_b", "vit_l_from_h", "vit_h_clip"):
        assert load_config(preset=preset).data.resampled is False, preset
    assert load_config(preset="demo").data.resampled is True
    with pytest.raises(ConfigError, match=r"data.num_samples=1281167 but the shards hold 256 samples .*"
                                          r"set data.num_samples=0 .* or data.resampled=true"):
        resolve_dataset(load_config(preset="vit_b", overrides=[f"data.shards={shards}"]), 0, tmp_path / "run")
    subset = load_config(preset="vit_b", overrides=[f"data.shards={shards}", "data.num_samples=0"])
    assert resolve_dataset(subset, 0, tmp_path / "run").num_samples == 256
