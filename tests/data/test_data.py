"""Tests for the synthetic shard writer and the webdataset training stream (CPU only, a few seconds)."""

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dbot_ds.data import shard_reader as data
from dbot_ds.data.augment import normalize
from dbot_ds.data.manifest import dataset_size, expand_shards, shard_pattern
from dbot_ds.data.shard_reader import skipped_samples
from dbot_ds.data.shards import cli
from dbot_ds.data.stream import build_train_loader
from dbot_ds.data.synthetic import write_synthetic_shards

NUM, PER_SHARD, SIZE = 120, 20, 48  # 6 shards


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = write_synthetic_shards(out, NUM, img_size=SIZE, per_shard=PER_SHARD, seed=0)
    return out, manifest


def read_samples(path):
    return list(wds.DataPipeline(wds.SimpleShardList(str(path)), wds.tarfile_to_samples()))


def take(loader, n):
    """The first n image batches (dropping the skip counts)."""
    return [images for images, _ in itertools.islice(iter(loader), n)]


def loader(pattern, **kw):
    args = dict(img_size=32, micro_batch=8, num_workers=0, seed=0, rank=0, world_size=1, shuffle_buffer=30)
    return build_train_loader(pattern, **{**args, **kw})


# ------------------------------------------------------------------------------------------- writer

def test_synthetic_writer_counts_and_manifest(synth):
    out, manifest = synth
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == NUM
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    keys = []
    for entry in manifest["shards"]:
        samples = read_samples(out / entry["name"])
        assert len(samples) == entry["num_samples"] == PER_SHARD
        keys += [s["__key__"] for s in samples]
        for s in samples[:3]:
            assert s["jpg"][:2] == b"\xff\xd8"  # real JPEG bytes
            img = Image.open(io.BytesIO(s["jpg"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))
            assert 0 <= int(s["cls"]) < 10
    assert keys == [f"{i:08d}" for i in range(NUM)]


def test_synthetic_writer_uneven_last_shard_and_determinism(tmp_path, synth):
    m = write_synthetic_shards(tmp_path / "a", 45, img_size=SIZE, per_shard=20, seed=0)
    assert [s["num_samples"] for s in m["shards"]] == [20, 20, 5]
    # Same seed -> byte-identical shards (sample i does not depend on the sharding); other seed -> different.
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (synth[0] / "shard-000000.tar").read_bytes()
    write_synthetic_shards(tmp_path / "b", 20, img_size=SIZE, per_shard=20, seed=1)
    assert (tmp_path / "b/shard-000000.tar").read_bytes() != (tmp_path / "a/shard-000000.tar").read_bytes()


def test_images_are_not_trivial(synth):
    samples = read_samples(synth[0] / "shard-000000.tar")
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"]))) for s in samples])
    assert pixels.std(axis=(1, 2)).min() > 5  # each image has structure
    assert np.abs(pixels[0].astype(int) - pixels[1]).mean() > 10  # and images differ


def test_cli_synthetic_prints_pattern(tmp_path, capsys):
    assert cli(["synthetic", "--out", str(tmp_path), "--num", "30", "--per-shard", "10", "--img-size", "32"]) == 0
    printed = capsys.readouterr().out
    pattern = f"{tmp_path}/shard-{{000000..000002}}.tar"
    assert pattern in printed and "manifest.json" in printed
    assert shard_pattern(tmp_path) == pattern
    assert dataset_size(pattern) == 30


def test_shard_pattern_single_shard(tmp_path):
    write_synthetic_shards(tmp_path, 5, img_size=16, per_shard=10)
    assert expand_shards(shard_pattern(tmp_path)) == [str(tmp_path / "shard-000000.tar")]


# ---------------------------------------------------------------------------------- shards and size

def test_expand_shards_braces_and_join(synth):
    out = synth[0]
    shards = expand_shards(f"{out}/shard-{{000001..000003}}.tar::{out}/shard-000005.tar")
    assert shards == [f"{out}/shard-00000{i}.tar" for i in (1, 2, 3, 5)]
    # Remote and pipe urls are not checked.
    assert expand_shards("pipe:cat /nope/a.tar::https://x.org/s-{0..1}.tar") == [
        "pipe:cat /nope/a.tar", "https://x.org/s-0.tar", "https://x.org/s-1.tar"]


def test_expand_shards_missing_files(synth):
    pattern = f"{synth[0]}/shard-{{000004..000009}}.tar"
    with pytest.raises(FileNotFoundError) as err:
        expand_shards(pattern)
    msg = str(err.value)
    assert "shard-000006.tar" in msg and "shard-000004.tar" not in msg
    assert "4 of 6" in msg and pattern in msg and "dbot-shards synthetic" in msg


def test_dataset_size(synth, tmp_path):
    out = synth[0]
    assert dataset_size(f"{out}/shard-{{000000..000005}}.tar") == NUM
    assert dataset_size(f"{out}/shard-{{000000..000001}}.tar") == 2 * PER_SHARD  # a subset counts its shards
    (tmp_path / "x.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="data.num_samples"):
        dataset_size(str(tmp_path / "x.tar"))


# ------------------------------------------------------------------------------------------- loader

def test_loader_yields_uint8_batches_forever(synth):
    pattern = shard_pattern(synth[0])
    for resampled in (True, False):
        # 20 batches of 8 = 160 samples > the 120 in the dataset: the stream must not end.
        batches = take(loader(pattern, resampled=resampled), 20)
        assert len(batches) == 20
        for b in batches:
            assert b.dtype == torch.uint8 and b.shape == (8, 3, 32, 32) and b.device.type == "cpu"
        assert torch.stack(batches).float().std() > 10


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_is_deterministic(synth, num_workers):
    pattern = shard_pattern(synth[0])
    torch.manual_seed(123)
    a = take(loader(pattern, num_workers=num_workers), 6)
    torch.manual_seed(456)  # the caller's global RNG must not matter...
    b = take(loader(pattern, num_workers=num_workers), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # with 2 workers these come from different workers: they must differ
    for other in (dict(seed=1), dict(rank=1, world_size=2)):  # ...but seed and rank must
        c = take(loader(pattern, num_workers=num_workers, **other), 6)
        assert not torch.equal(torch.stack(a), torch.stack(c))


def test_loader_leaves_global_rng_alone(synth):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(loader(shard_pattern(synth[0])), 2)
    assert torch.equal(torch.rand(3), expected)


def test_non_resampled_too_few_shards(synth):
    with pytest.raises(ValueError, match=r"6 shards < 2 ranks x 4 workers = 8.*resampled=true"):
        loader(shard_pattern(synth[0]), resampled=False, world_size=2, num_workers=4)
    loader(shard_pattern(synth[0]), resampled=False, world_size=3, num_workers=2)  # 6 >= 6 is fine


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path, synth, caplog, monkeypatch):
    good = _jpeg(0)
    png = io.BytesIO()
    Image.new("L", (40, 40), 128).save(png, format="PNG")  # non-JPEG, non-RGB: must be converted, not skipped
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "a", "jpg": good})
        sink.write({"__key__": "b", "jpg": good[: len(good) // 2]})  # truncated JPEG
        sink.write({"__key__": "c", "cls": b"3"})  # no image at all
        sink.write({"__key__": "d", "jpg": b"definitely not a jpeg"})
        sink.write({"__key__": "e", "png": png.getvalue()})
    # A truncated tar: a tar-level error that the handler must absorb as well.
    whole = (synth[0] / "shard-000000.tar").read_bytes()
    with tarfile.open(synth[0] / "shard-000000.tar") as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".jpg")][5]
    (tmp_path / "cut.tar").write_bytes(whole[: member.offset_data + member.size // 2])  # cut inside a JPEG

    monkeypatch.setattr(data, "_last_warning", 0.0)
    before = skipped_samples()
    batches = take(loader(f"{tmp_path}/bad.tar::{tmp_path}/cut.tar", micro_batch=4), 10)
    assert len(batches) == 10 and all(b.shape == (4, 3, 32, 32) for b in batches)
    assert skipped_samples() - before >= 10  # bad.tar is drawn many times, 3 skips each
    assert len([r for r in caplog.records if r.name == "dbot_ds.data.shard_reader"]) == 1  # rate-limited: one per 10 s
    # With worker processes the counter lives in the workers: the counts travel with the batches.
    counted = sum(n.skipped for _, n in itertools.islice(iter(loader(f"{tmp_path}/bad.tar", micro_batch=4, num_workers=2)), 10))
    assert counted >= 10
    with tarfile.open(tmp_path / "cut.tar", "r|") as tf, pytest.raises(tarfile.ReadError):
        for member in tf:  # sanity: the cut tar really is broken for a streaming reader like webdataset
            tf.extractfile(member).read()


def test_only_broken_data_fails_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_MAX_CONSECUTIVE_SKIPS", 50)
    with wds.TarWriter(str(tmp_path / "empty.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"junk"})
    with pytest.raises(RuntimeError, match="in a row"):
        take(loader(str(tmp_path / "empty.tar")), 1)


# ---------------------------------------------------------------------------------------- normalize

def test_normalize_matches_manual():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out, expected)
    assert normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229)
    half = normalize(images, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=1e-2, atol=2e-2)
