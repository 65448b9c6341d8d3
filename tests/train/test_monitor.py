"""The kNN monitor's parts without DeepSpeed: DINO's weighted vote, rank shares of a labelled set, and the
errors a bad evaluation set gives before training starts. (Runs with the monitor on, ZeRO-2/3 on 2 ranks:
tests/test_export.py.)"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from dbot_ds.config import ConfigError, load_config
from dbot_ds.data.manifest import shard_pattern
from dbot_ds.data.synthetic import write_synthetic_shards
from dbot_ds.evaluate.knn import interleave, load_labelled, load_shares, weighted_knn
from dbot_ds.train.monitor import KnnMonitor


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_weighted_vote_follows_similarity_not_the_majority():
    """k=3: two class-0 neighbours at cosine 0.6 lose to one class-1 neighbour at cosine 0.99 with T=0.07
    (exp(0.99/0.07) > 2 exp(0.6/0.07)); with T=10 the weights are nearly equal and the majority wins."""
    q = unit([1.0, 0.0])
    bank = torch.cat([unit([0.6, 0.8], [0.6, -0.8]), unit([0.99, (1 - 0.99 ** 2) ** 0.5]), unit([-1.0, 0.0])])
    labels = torch.tensor([0, 0, 1, 2])
    assert weighted_knn(bank, labels, q, torch.tensor([1]), k=3, temperature=0.07) == (100.0, 100.0)
    assert weighted_knn(bank, labels, q, torch.tensor([1]), k=3, temperature=10.0)[0] == 0.0
    # as DINO's: top-5 ranks all classes, voted or not, so with 3 classes it always hits
    assert weighted_knn(bank, labels, q, torch.tensor([2]), k=3, temperature=0.07) == (0.0, 100.0)
    with pytest.raises(ValueError, match="fewer than k=5"):
        weighted_knn(bank, labels, q, torch.tensor([1]), k=5)


def test_rank_shares_together_are_the_whole_set(tmp_path):
    write_synthetic_shards(tmp_path, 23, img_size=40, per_shard=7, seed=3)
    pattern = shard_pattern(tmp_path)
    whole = load_labelled(pattern, 32)
    assert whole.images.shape == (23, 3, 32, 32) and whole.images.dtype == torch.uint8
    assert torch.equal(load_labelled(str(tmp_path), 32).images, whole.images)        # a folder of shards too
    split = load_shares(pattern, 32, key="eval.shards", query_every=5)
    assert split["query"].labels.tolist() == whole.labels[::5].tolist()
    for world in (2, 3):
        shares = [load_shares(pattern, 32, key="eval.shards", query_every=5, rank=r, world=world) for r in range(world)]
        for name, n in (("bank", 18), ("query", 5)):
            assert all(torch.equal(s[name].labels, split[name].labels) for s in shares)        # every rank: all labels
            rebuilt = interleave([s[name].images for s in shares], n)
            assert torch.equal(rebuilt, split[name].images), (world, name)


def _unlabelled_shards(folder, n: int, with_image: bool = True, with_cls: bool = False) -> str:
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, format="JPEG")
    with wds.TarWriter(str(folder / "s-0.tar")) as sink:
        for i in range(n):
            sample = {"__key__": f"{i:04d}"}
            if with_image:
                sample["jpg"] = buf.getvalue()
            if with_cls:
                sample["cls"] = b"1"
            sink.write(sample)
    return str(folder / "s-0.tar")


@pytest.mark.parametrize("case", ["no_cls", "empty_query", "small_bank"])
def test_bad_evaluation_sets_fail_naming_the_key_and_the_fix(case, tmp_path):
    write_synthetic_shards(tmp_path / "ok", 30, img_size=40, per_shard=30)
    good = shard_pattern(tmp_path / "ok")
    overrides = {"no_cls": [f"eval.shards={_unlabelled_shards(tmp_path / 'u', 4)}"],
                 "empty_query": [f"eval.shards={good}",
                                 f"eval.query_shards={_unlabelled_shards(tmp_path / 'q', 3, False, True)}"],
                 "small_bank": [f"eval.shards={good}", "eval.k=25"]}[case]
    cfg = load_config(preset="demo", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        KnnMonitor(cfg, (cfg.eval.shards, cfg.eval.query_shards), 0, 1, torch.device("cpu"), torch.float32)
    want = {"no_cls": ["eval.shards=", "has no 'cls' label", "labelled shards"],
            "empty_query": ["query set is empty", "eval.query_shards"],
            "small_bank": ["holds 24 images, fewer than eval.k=25", "lower eval.k"]}[case]
    assert all(w in str(err.value) for w in want), str(err.value)


def test_monitor_config_is_checked_before_any_data_is_read():
    for bad in (["eval.k=0"], ["eval.query_every=1"], ["eval.temperature=0"]):
        with pytest.raises(ConfigError, match="eval."):
            load_config(preset="demo", overrides=bad)
    # `eval.shards=` turns the monitor off, whatever else is set for it (config._validate_eval)
    off = load_config(preset="demo", overrides=["eval.shards=", "eval.query_shards=/x.tar"]).eval
    assert (off.shards, off.query_shards, off.synthetic_num) == ("", "", 0)
