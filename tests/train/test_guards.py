"""The skipped-step policy as a pure function of DeepSpeed's cumulative skip counter."""
from dbot_ds.plan.stages import StagePlan
from dbot_ds.train.guards import SkippedSteps

PLAN = StagePlan(lengths=(10, 10), teacher_depths=(0, 4), warmup_steps=1, peak_lr=1e-3, min_lr=0.0)


def feed(tracker: SkippedSteps, skipped_at: set[int], steps: range) -> None:
    total = tracker.total
    for step in steps:
        total += step in skipped_at
        tracker.update(step, total)


def test_isolated_skips_pass_and_a_row_stops_naming_the_first():
    t = SkippedSteps(max_in_row=3, max_frac=0.5, skipped_so_far=0)
    feed(t, {2}, range(1, 11))
    assert t.total == 1 and t.verdict(10, PLAN) is None
    t.reset_window()
    feed(t, {12, 13, 14}, range(11, 15))
    msg = t.verdict(4, PLAN)
    assert "3 optimizer steps in a row, from stage 1, step 2 of the stage (global step 12)" in msg


def test_share_of_a_window_stops_but_never_one_skip():
    t = SkippedSteps(max_in_row=0, max_frac=0.5, skipped_so_far=5)     # 5 skipped before a resume
    feed(t, {1, 3}, range(1, 5))
    assert "skipped 2 of the last 4 optimizer steps, the first at stage 0, step 1" in t.verdict(4, PLAN)
    one = SkippedSteps(max_in_row=3, max_frac=0.5, skipped_so_far=0)
    feed(one, {1}, range(1, 2))
    assert one.verdict(1, PLAN) is None                                  # 1 of 1, but isolated
    off = SkippedSteps(max_in_row=0, max_frac=0.0, skipped_so_far=0)
    feed(off, {1, 2, 3, 4}, range(1, 5))
    assert off.verdict(4, PLAN) is None and off.total == 4
