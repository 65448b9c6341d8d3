"""`dbot-bench repro`'s bookkeeping: the verdict's rule, the regime's fixed numbers, --rescore's refusal.
Nothing is trained here (the plain loop's own test trains 3 steps; the trainer's representation test is
tests/train/test_representation.py)."""
from __future__ import annotations

import pytest

from dbot_ds.bench.repro import DIGITS_TRAIN, REGIME, measure_seed, verdict
from dbot_ds.config import load_config


def _seed(init: float, stage0: float, stage1: float) -> dict:
    return {"init": {"m": init}, "stage0": {"m": stage0}, "stage1": {"m": stage1}}


def test_verdict_needs_two_standard_deviations_and_every_seed_gaining():
    shown = verdict({0: _seed(70, 90, 93), 1: _seed(71, 91, 94), 2: _seed(72, 92, 95)}, "m")
    assert shown["stage0_over_init"] == {"metric": "m", "gain": 20.0, "sd": 1.0, "min_seed_gain": 20.0, "shown": True}
    assert shown["stage1_over_stage0"]["shown"] and shown["stage1_over_stage0"]["gain"] == 3.0
    noisy = verdict({0: _seed(70, 90, 95), 1: _seed(70, 85, 86), 2: _seed(70, 95, 96)}, "m")
    assert noisy["stage1_over_stage0"]["gain"] == 2.33 and not noisy["stage1_over_stage0"]["shown"]   # sd 5
    one_loses = verdict({0: _seed(70, 90, 93), 1: _seed(70, 90, 93), 2: _seed(70, 90, 89.9)}, "m")
    assert one_loses["stage1_over_stage0"]["min_seed_gain"] < 0 and not one_loses["stage1_over_stage0"]["shown"]


def test_regime_matches_the_demo_model_and_the_digits_split():
    cfg = load_config(preset="demo", overrides=REGIME)
    assert cfg.teacher.init_depth == cfg.model.depth               # a random stage-0 teacher as deep as the student
    assert not cfg.data.resampled and cfg.data.shuffle_buffer == DIGITS_TRAIN
    from dbot_ds.data.digits import NUM_DIGITS, split_indices
    assert len(split_indices(NUM_DIGITS, "train")) == DIGITS_TRAIN


def test_rescore_without_trained_encoders_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="run without --rescore to train them"):
        measure_seed(tmp_path / "digits", tmp_path, 0, 10, 8, 1, [], rescore=True)
