"""Tests for `dbot-bench fixture` and `dbot-bench data` (CPU, tiny sizes; nothing about speed is asserted)."""

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

pytest.importorskip("skimage")

from dbot_ds.bench.cli import cli  # noqa: E402
from dbot_ds.data.manifest import dataset_size, expand_shards  # noqa: E402

NUM = 24
REQUIRED = ("img_per_s", "img_per_s_per_worker", "baseline_img_per_s", "baseline_img_per_s_per_worker", "speedup",
            "workers", "batch", "img_size", "steps", "cpu_count", "torch", "pillow")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchfix")
    assert cli(["fixture", "--out", str(out), "--num", str(NUM)]) == 0
    return out


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_fixture_shards_and_files_hold_the_same_real_photos(fixture_dir):
    out = Path(fixture_dir)
    pattern = str(out / "shard-000000.tar")
    assert dataset_size(pattern) == NUM
    samples = list(wds.DataPipeline(wds.SimpleShardList(expand_shards(pattern)), wds.tarfile_to_samples()))
    files = {p.stem: p for p in (out / "files").glob("*/*.jpg")}
    assert len(samples) == len(files) == NUM
    classes = sorted(p.name for p in (out / "files").iterdir())
    stds = []
    for s in samples:
        path = files[s["__key__"]]
        assert path.read_bytes() == s["jpg"]                    # the baseline reads identical bytes
        assert classes[int(s["cls"])] == path.parent.name       # label = source photo = ImageFolder class
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert 375 <= min(img.size) <= 500 and 1.15 < max(img.size) / min(img.size) < 1.5  # ~4:3
        stds.append(np.asarray(img, np.float32).std())
    assert min(stds) > 5 and np.mean(stds) > 30                 # photos, not flat fills
    assert len({s["jpg"] for s in samples}) == NUM              # every image a different view
    assert len(classes) >= 10


def test_fixture_cli_prints_pattern_and_folder(capsys, tmp_path):
    assert cli(["fixture", "--out", str(tmp_path), "--num", "3", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"shard pattern: data.shards='{tmp_path / 'shard-000000.tar'}'" in printed
    assert f"class folders: {tmp_path / 'files'}" in printed


def check_record(record: dict, workers: int) -> None:
    assert all(k in record for k in REQUIRED), sorted(set(REQUIRED) - set(record))
    for k in ("img_per_s", "img_per_s_per_worker", "baseline_img_per_s", "baseline_img_per_s_per_worker", "speedup"):
        assert record[k] > 0 and math.isfinite(record[k]), k
    assert record["workers"] == workers and record["cpu_count"] >= 1
    assert record["img_per_s_per_worker"] == pytest.approx(record["img_per_s"] / max(workers, 1), rel=1e-6)
    assert record["baseline_img_per_s_per_worker"] == pytest.approx(
        record["baseline_img_per_s"] / max(workers, 1), rel=1e-6)
    assert record["speedup"] == pytest.approx(
        record["img_per_s_per_worker"] / record["baseline_img_per_s_per_worker"], rel=1e-6)


def test_data_bench_json_last_line(fixture_dir, capsys, tmp_path):
    out_json = tmp_path / "result.json"
    argv = ["data", "--shards", str(Path(fixture_dir) / "shard-000000.tar"), "--baseline-dir",
            str(Path(fixture_dir) / "files"), "--workers", "0", "--steps", "2", "--batch", "4", "--img-size", "32",
            "--warmup", "1", "--json", str(out_json)]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    record = last_json(printed)
    check_record(record, workers=0)
    assert (record["batch"], record["img_size"], record["steps"]) == (4, 32, 2)
    assert "normalize on the CPU" in printed or record["normalize_device"] != "cpu"
    assert json.loads(out_json.read_text()) == record


def test_data_bench_extracts_shards_when_no_folder_and_cleans_up(fixture_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the extracted copy goes
    argv = ["data", "--shards", str(Path(fixture_dir) / "shard-000000.tar"), "--workers", "1", "--steps", "1",
            "--batch", "4", "--img-size", "32", "--warmup", "1", "--profile"]
    assert cli(argv) == 0
    record = last_json(capsys.readouterr().out)
    check_record(record, workers=1)
    assert record["baseline_extracted_images"] == NUM
    profile = record["profile_ms_per_img"]
    assert {"decode_pil", "crop_resize_flip_pil", "collate_stack", "ipc_copy_to_shm", "ours_worker_total",
            "baseline_worker_total"} <= set(profile)
    assert all(v >= 0 for v in profile.values()) and profile["ours_worker_total"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary class folders are gone


def test_data_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli(["data", "--shards", "x.tar", "--workers", "0", "--steps", "0"])
