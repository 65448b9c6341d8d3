"""Stage schedule: lengths, teacher depths, LR values."""
import math

import pytest

from dbot_ds.config import ConfigError, load_config
from dbot_ds.plan.stages import lr_at, make_plan, peak_lr, teacher_depths


def test_reference_vit_h_plan():
    cfg = load_config(preset="vit_h", overrides=["data.shards=/x/{0..1}.tar"])
    plan = make_plan(cfg, 1281167 // 4096)                   # 312 steps per epoch
    assert plan.lengths == (800 * 312, 800 * 312)
    assert plan.warmup_steps == 40 * 312
    assert plan.teacher_depths == (0, 32)
    assert plan.peak_lr == pytest.approx(2.4e-3)             # 1.5e-4 x 4096 / 256
    assert plan.starts == (0, 249600)


def test_vit_b_starts_from_a_12_block_teacher():
    assert make_plan(load_config(preset="vit_b"), 312).teacher_depths == (12, 12)
    assert teacher_depths(0, 24, 3) == [0, 24, 24]


def test_lr_warmup_then_cosine_restarting_each_stage():
    cfg = load_config(overrides=["schedule.stage_steps=[10,20]", "schedule.warmup_steps=4", "optim.blr=2.56e-2",
                                 "optim.global_batch=64", "optim.min_lr=1e-4"])
    plan = make_plan(cfg, 0)
    peak = 2.56e-2 * 64 / 256
    assert plan.lr(0) == 0 and plan.lr(2) == pytest.approx(peak / 2)
    assert plan.lr(4) == pytest.approx(peak)
    assert plan.lr(7) == pytest.approx(1e-4 + (peak - 1e-4) * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert plan.lr(10) == 0 and plan.lr(14) == pytest.approx(peak)      # stage 1 restarts warmup
    assert plan.lr(29) == pytest.approx(lr_at(19, peak=peak, min_lr=1e-4, warmup_steps=4, stage_steps=20))
    assert plan.locate(9) == (0, 9) and plan.locate(10) == (1, 0) and plan.locate(30) == (2, 0)
    assert plan.is_stage_end(10) and plan.is_stage_end(30) and not plan.is_stage_end(11)
    assert peak_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_epochs_convert_with_steps_per_epoch_and_bad_warmup_fails():
    cfg = load_config(overrides=["schedule.stage_epochs=[1.5,2]", "schedule.warmup_epochs=0.5"])
    assert make_plan(cfg, 10).lengths == (15, 20) and make_plan(cfg, 10).warmup_steps == 5
    with pytest.raises(ConfigError, match="warmup"):
        make_plan(load_config(overrides=["schedule.stage_steps=[3,8]", "schedule.warmup_steps=3"]), 0)
    with pytest.raises(ConfigError, match="smaller than"):
        make_plan(cfg, 0)
