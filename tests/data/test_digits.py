"""`dbot-shards digits`: scikit-learn's real 8x8 digits as webdataset shards (split rule, labels, determinism, CLI)."""
from __future__ import annotations

import io
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn", reason="the digits shards need scikit-learn (pip install -e '.[test]')")

from dbot_ds.data.digits import NUM_DIGITS, load_digits, split_indices, write_digits_shards  # noqa: E402
from dbot_ds.data.manifest import dataset_size, expand_shards  # noqa: E402
from dbot_ds.data.shards import cli  # noqa: E402


def read_samples(folder: Path) -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, cls) of every sample in the shards of `folder`, in shard order."""
    out = []
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        keys = sorted({n.split(".", 1)[0] for n in files})
        out += [(k, files[f"{k}.jpg"], int(files[f"{k}.cls"].decode())) for k in keys]
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """The train split, written once (the val split is written through the CLI in its own test)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(root / "train", split="train")
    return {"train": root / "train", "root": root}


def test_counts_and_split_rule(written):
    _, targets = load_digits()
    assert len(targets) == NUM_DIGITS == 1797
    train = split_indices(NUM_DIGITS, "train")
    val = split_indices(NUM_DIGITS, "val")
    assert len(val) == 360 and len(train) == 1437                   # ceil(1797 / 5) val, the rest train
    assert list(val) == list(range(0, NUM_DIGITS, 5))
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(NUM_DIGITS))
    assert sorted(split_indices(NUM_DIGITS, "all")) == list(range(NUM_DIGITS))
    assert list(train) != sorted(train)                             # shuffled, so shards are class-mixed
    assert dataset_size(str(written["train"] / "shard-{000000..000005}.tar")) == 1437


def test_labels_follow_sklearn_targets_and_images_decode(written):
    _, targets = load_digits()
    samples = read_samples(written["train"])
    order = split_indices(NUM_DIGITS, "train")
    assert [k for k, _, _ in samples] == [f"{i:08d}" for i in range(1437)]
    assert [c for _, _, c in samples] == targets[order].tolist()
    first_shard = [c for _, _, c in samples[:256]]
    assert set(first_shard) == set(range(10))                       # every shard holds all classes
    for _, jpg, _ in samples[::97]:
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img, dtype=np.float32)
        assert pixels.std() > 30 and pixels.min() < 80 and pixels.max() > 200   # dark ink on white, not blank


def test_image_keeps_the_digit():
    """The upsampled image, shrunk back to 8x8, still matches the source digit (recognisable, not distorted)."""
    images, _ = load_digits()
    from dbot_ds.data.digits import digit_image
    for i in (0, 1, 500):
        small = np.asarray(digit_image(images[i], 32).convert("L").resize((8, 8), Image.Resampling.BOX), np.float32)
        ink = 255 - small
        assert np.corrcoef(ink.ravel(), images[i].ravel())[0, 1] > 0.95


def test_rerun_is_byte_identical(written, tmp_path):
    write_digits_shards(tmp_path, split="train")
    for f in sorted(written["train"].iterdir()):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_cli_val_pattern_is_accepted_and_disjoint_from_train(written, capsys):
    out = written["root"] / "val"
    assert cli(["digits", "--out", str(out), "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 360 samples in 2 shards" in printed
    pattern = re.search(r"shard pattern: data.shards='([^']+)'", printed).group(1)
    assert pattern == str(out / "shard-{000000..000001}.tar")
    assert len(expand_shards(pattern)) == 2 and dataset_size(pattern) == 360
    _, targets = load_digits()
    val = read_samples(out)
    assert [c for _, _, c in val] == targets[::5].tolist()
    # Disjoint by index (test_counts_and_split_rule) and by content: the 1797 source digits are all distinct.
    train_jpgs = {j for _, j, _ in read_samples(written["train"])}
    assert not any(j in train_jpgs for _, j, _ in val)


def test_missing_sklearn_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)      # import of sklearn.datasets now fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install scikit-learn.*\[test\]"):
        load_digits()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        write_digits_shards(tmp_path, split="test")
    with pytest.raises(ValueError, match="size must be >= 8"):
        write_digits_shards(tmp_path, size=4)
