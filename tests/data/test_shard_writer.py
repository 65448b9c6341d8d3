"""Tests for `dbot-shards imagenet` / `dbot-shards folder` (dbot_ds.data.shard_writer), on tiny fixtures (CPU, seconds)."""

import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dbot_ds.data.manifest import dataset_size, shard_pattern
from dbot_ds.data.shards import cli
from dbot_ds.data.stream import build_train_loader

SYNSETS = ["n01440764", "n01443537", "n02102040"]
PER_SHARD = 4  # 15 good + 2 bad files = 17 planned -> 5 shards


def _image(seed, fmt="JPEG", size=24):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tar_bytes(members):
    """An uncompressed tar of {name: bytes}, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The same tiny ImageNet as class folders and as a tar of per-class tars, plus its good/bad files."""
    root = tmp_path_factory.mktemp("imagenet")
    good = {(s, f"{s}_{j}.JPEG"): _image(10 * c + j) for c, s in enumerate(SYNSETS) for j in range(5)}
    cut = _image(99)
    bad = {(SYNSETS[1], "n01443537_text.JPEG"): b"this is not an image\n",
           (SYNSETS[2], "n02102040_cut.JPEG"): cut[: len(cut) // 2]}
    files = {**good, **bad}
    for (synset, name), data in files.items():
        (root / "train" / synset).mkdir(parents=True, exist_ok=True)
        (root / "train" / synset / name).write_bytes(data)
    (root / "train" / SYNSETS[0] / "readme.txt").write_text("not an image extension: ignored\n")
    # Inner members in reverse order: the plan must not depend on the archive's order.
    inner = {s: _tar_bytes({n: d for (s2, n), d in reversed(files.items()) if s2 == s}) for s in SYNSETS}
    tar = root / "ILSVRC2012_img_train.tar"
    tar.write_bytes(_tar_bytes({f"{s}.tar": inner[s] for s in reversed(SYNSETS)}))
    return {"dir": root / "train", "tar": tar, "good": good, "bad": {name for _, name in bad}}


def convert(kind, src, out, *extra):
    return cli([kind, "--src", str(src), "--out", str(out), "--per-shard", str(PER_SHARD), *extra])


@pytest.fixture(scope="module")
def converted(imagenet, tmp_path_factory):
    """Output dirs of `imagenet` from both sources (the tar one with 2 worker processes), and the printout."""
    outs, printed = {}, {}
    for source, workers in (("dir", "1"), ("tar", "2")):
        outs[source] = tmp_path_factory.mktemp(f"out_{source}")
        capture = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdout", capture)
            assert convert("imagenet", imagenet[source], outs[source], "--workers", workers) == 0
        printed[source] = capture.getvalue()
    return outs, printed


def read_shards(out):
    """{shard name: [samples]} in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {e["name"]: list(wds.DataPipeline(wds.SimpleShardList(str(out / e["name"])), wds.tarfile_to_samples()))
            for e in manifest["shards"]}


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


# ------------------------------------------------------------------------------------------ imagenet

@pytest.mark.parametrize("source", ["dir", "tar"])
def test_imagenet_labels_counts_bytes_and_skips(imagenet, converted, source):
    out, printed = converted[0][source], converted[1][source]
    manifest = json.loads((out / "manifest.json").read_text())
    shards = read_shards(out)
    assert list(shards) == [f"shard-{i:06d}.tar" for i in range(5)]
    assert [len(s) for s in shards.values()] == [e["num_samples"] for e in manifest["shards"]]
    assert manifest["num_samples"] == len(imagenet["good"]) == 15
    assert (out / "synsets.txt").read_text().split() == SYNSETS

    samples = [s for shard in shards.values() for s in shard]
    assert len({s["__key__"] for s in samples}) == 15
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == SYNSETS.index(meta["synset"])
        assert s["jpg"] == imagenet["good"][meta["synset"], meta["file"]]  # original bytes, untouched
    assert {(json.loads(s["json"])["synset"], json.loads(s["json"])["file"]) for s in samples} == set(imagenet["good"])

    # Shuffled across shards: classes are mixed within shards and not in sorted order overall.
    by_key = [json.loads(s["json"])["synset"] for s in sorted(samples, key=lambda s: s["__key__"])]
    assert by_key != sorted(by_key)
    assert any(len({json.loads(s["json"])["synset"] for s in shard}) > 1 for shard in shards.values())

    # Bad files: skipped, listed in skipped.txt and the printout; a non-image extension is just ignored.
    listed = [line.split("\t")[0] for line in (out / "skipped.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(imagenet["bad"]) and manifest["num_skipped_files"] == 2
    assert "skipped files: 2" in printed and all(name in printed for name in imagenet["bad"])
    assert f"data.shards='{out}/shard-{{000000..000004}}.tar'" in printed
    assert not list(out.glob("*.tmp"))


def test_folder_and_tar_sources_give_identical_shards(converted):
    outs = converted[0]
    # Same files -> same plan and fingerprint; mtime-free tars -> even the shard files are identical.
    assert shard_bytes(outs["dir"]) == shard_bytes(outs["tar"])
    manifests = [json.loads((outs[s] / "manifest.json").read_text()) for s in ("dir", "tar")]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def test_resume_rewrites_only_missing_shard(imagenet, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert("imagenet", imagenet["dir"], out, "--workers", "1") == 0
    first, manifest = shard_bytes(out), (out / "manifest.json").read_text()
    old_ns = 10**18  # mark the survivors with a distinctive mtime: a rewrite would change it
    for name in first:
        os.utime(out / name, ns=(old_ns, old_ns))
    (out / "shard-000002.tar").unlink()
    (out / "shard-000003.tar.tmp").write_bytes(b"half a shard from a killed run")
    capsys.readouterr()

    assert convert("imagenet", imagenet["dir"], out, "--workers", "2") == 0
    assert "1 written, 4 already complete" in capsys.readouterr().out
    assert shard_bytes(out) == first and (out / "manifest.json").read_text() == manifest
    assert [n for n in first if (out / n).stat().st_mtime_ns == old_ns] == [
        f"shard-{i:06d}.tar" for i in (0, 1, 3, 4)]
    assert not list(out.glob("*.tmp"))

    # Another plan into the same directory is refused, and nothing is touched.
    assert cli(["imagenet", "--src", str(imagenet["dir"]), "--out", str(out), "--per-shard", "5"]) == 2
    err = capsys.readouterr().err
    assert "different plan" in err and "per_shard: 4 on disk vs 5 now" in err
    assert shard_bytes(out) == first


def test_refuses_directory_with_foreign_shards(imagenet, tmp_path, capsys):
    assert cli(["synthetic", "--out", str(tmp_path), "--num", "4", "--img-size", "16"]) == 0
    assert convert("imagenet", imagenet["dir"], tmp_path) == 2
    assert "not from this command" in capsys.readouterr().err


def test_flat_val_with_labels_and_train_synsets(imagenet, converted, tmp_path, capsys):
    val = tmp_path / "val"
    val.mkdir()
    truth = {f"ILSVRC2012_val_{i:08d}.JPEG": SYNSETS[i % 2] for i in range(1, 5)}  # only 2 of the 3 classes
    for i, name in enumerate(truth):
        (val / name).write_bytes(_image(100 + i))
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"{name[:-5]},{synset} 1 2 30 40 {synset} 5 6 7 8\n" for name, synset in truth.items()))
    plain = tmp_path / "val.txt"
    plain.write_text("".join(f"{name} {synset}\n" for name, synset in truth.items()))
    train_synsets = converted[0]["dir"] / "synsets.txt"
    for i, labels in enumerate((kaggle, plain)):
        out = tmp_path / f"out{i}"
        assert convert("imagenet", val, out, "--labels", str(labels), "--synsets", str(train_synsets)) == 0
        samples = [s for shard in read_shards(out).values() for s in shard]
        assert {json.loads(s["json"])["file"]: SYNSETS[int(s["cls"])] for s in samples} == truth
    # Without labels a flat folder is an error that says what to do.
    assert convert("imagenet", val, tmp_path / "nolabels") == 2
    assert "--labels" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- folder

def test_folder_unlabeled_keeps_formats_and_paths(tmp_path):
    src = tmp_path / "photos"
    files = {"a.jpg": _image(1), "trip/b.JPEG": _image(2), "trip/day2/c.PNG": _image(3, "PNG"),
             "d.webp": _image(4, "WEBP"), "trip/e.jpeg": _image(5), "f.png": _image(6, "PNG")}
    for rel, data in {**files, "notes.txt": b"ignored", "broken.jpg": b"\xff\xd8 nope"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    assert convert("folder", src, out) == 0
    samples = [s for shard in read_shards(out).values() for s in shard]
    stored = {}
    for s in samples:
        assert "cls" not in s
        (key,) = {"jpg", "png", "webp"} & set(s)
        stored[json.loads(s["json"])["file"]] = (key, s[key])
    expected_key = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
    assert stored == {rel: (expected_key[Image.open(io.BytesIO(d)).format], d) for rel, d in files.items()}
    assert (out / "skipped.txt").read_text().startswith("broken.jpg\t")
    assert not (out / "synsets.txt").exists()


# -------------------------------------------------------------------------------------------- loader

def test_project_loader_reads_the_shards(converted):
    pattern = shard_pattern(converted[0]["tar"])
    assert dataset_size(pattern) == 15
    loader = build_train_loader(pattern, img_size=32, micro_batch=4, num_workers=0, seed=0, rank=0, world_size=1)
    batches = list(itertools.islice(iter(loader), 5))  # 20 samples > 15: the stream goes on
    for images, n_skipped in batches:
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and n_skipped.skipped == 0
    assert torch.stack([b for b, _ in batches]).float().std() > 10
