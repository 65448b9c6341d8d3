"""The miniature's plain loop (`dbot-bench repro --loop minimal`): what it writes and how its swap behaves.
Two stages of 3 steps on random images; nothing about representation quality is asserted here."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dbot_ds.bench.repro_loop import train_two_stages
from dbot_ds.config import load_config
from dbot_ds.data.stream import mix_seed
from dbot_ds.model.vit import build_student

OVERRIDES = ["schedule.stage_epochs=[]", "schedule.stage_steps=[3,3]", "schedule.warmup_steps=1",
             "optim.global_batch=8", "optim.micro_batch=8", "optim.precision=fp32", "teacher.init_depth=4",
             "run.seed=3"]


def _encoder(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "encoder.safetensors")


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_writes_init_and_every_stage_end_encoder(tmp_path, images):
    cfg = load_config(preset="demo", overrides=OVERRIDES)
    train_two_stages(cfg, images, tmp_path)
    init, s0, s1 = (_encoder(tmp_path / name) for name in ("init", "stage0", "stage1"))
    assert init.keys() == s0.keys() == s1.keys()
    expected = build_student(cfg.model, seed=mix_seed(3, 0)).encoder.state_dict()
    assert init["cls_token"].equal(expected["cls_token"])           # the trainer's seeded initial student
    assert not torch.equal(init["patch_embed.proj.weight"], s0["patch_embed.proj.weight"])
    assert not torch.equal(s0["patch_embed.proj.weight"], s1["patch_embed.proj.weight"])


def test_keep_student_ablation_changes_only_stage_1(tmp_path, images):
    cfg = load_config(preset="demo", overrides=OVERRIDES)
    train_two_stages(cfg, images, tmp_path / "a")
    train_two_stages(cfg, images, tmp_path / "b", ablate="keep_student")
    a0, b0 = _encoder(tmp_path / "a" / "stage0"), _encoder(tmp_path / "b" / "stage0")
    assert all(a0[k].equal(b0[k]) for k in a0)                         # the same stage 0, step for step
    a1, b1 = _encoder(tmp_path / "a" / "stage1"), _encoder(tmp_path / "b" / "stage1")
    assert not all(a1[k].equal(b1[k]) for k in a1)
    with pytest.raises(ValueError, match="unknown ablation 'nope'"):
        train_two_stages(cfg, images, tmp_path / "c", ablate="nope")


def test_trainer_stream_ablation_trains_on_the_trainers_batches(tmp_path, images, shards):
    from dbot_ds.data.manifest import shard_pattern
    cfg = load_config(preset="demo", overrides=OVERRIDES + ["data.resampled=false", "data.num_workers=0"])
    train_two_stages(cfg, images, tmp_path / "a", ablate="trainer_stream", shards=shard_pattern(shards))
    train_two_stages(cfg, images, tmp_path / "b")
    a0, b0 = _encoder(tmp_path / "a" / "stage0"), _encoder(tmp_path / "b" / "stage0")
    assert not all(a0[k].equal(b0[k]) for k in a0)                     # other batches, another stage 0
    with pytest.raises(ValueError, match="pass shards=PATTERN"):
        train_two_stages(cfg, images, tmp_path / "c", ablate="trainer_stream")
