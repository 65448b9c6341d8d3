"""Resume on another layout through DeepSpeed's universal checkpoint, with real processes: 2 ranks ZeRO-2 ->
1 rank -> 2 ranks -> 2 ranks ZeRO-3, each resume followed by a stage switch, on an exact-epoch stream whose epochs
are carried over between reader layouts."""
from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict

import pytest
import torch
from conftest import TINY, read_metrics, run, torchrun_cmd
from testkit import write_shards

pytestmark = pytest.mark.slow       # every test here starts real processes or trains a run


def _launch(nproc: int, overrides: list[str], probe_out) -> str:
    import os
    os.environ["DBOT_PROBE_OUT"] = str(probe_out)          # inherited by the launched ranks (conftest._env)
    cmd = (torchrun_cmd(nproc) + ["tests/reshard_probe.py"] if nproc else ["python", "tests/reshard_probe.py"])
    proc = run(cmd + ["--preset", "demo"] + overrides)
    assert proc.returncode == 0, proc.tail
    return proc.stdout + proc.stderr              # all of it: ZeRO-3's deprecation warnings can fill the tail


def _same(saved: dict, resumed: dict) -> None:
    """fp32 masters and Adam moments bit-identical; step counts, step, stage and LR equal."""
    tensors = [k for k in saved if isinstance(saved[k], torch.Tensor)]
    assert tensors and set(tensors) == {k for k in resumed if isinstance(resumed[k], torch.Tensor)}
    for k in tensors:
        assert torch.equal(saved[k], resumed[k]), k
    assert [saved[k] for k in ("steps", "step", "stage", "lr")] == [resumed[k] for k in ("steps", "step", "stage", "lr")]
    assert any(saved[k].abs().sum() > 0 for k in tensors if k.endswith("/exp_avg_sq"))


def _epochs_are_whole(batches: list[dict]) -> None:
    """Every epoch holds each of the 60 samples. An epoch interrupted by a layout change is finished by a block
    (another unit) that reads only what the epoch still owed: the units of an epoch share no sample, and the
    unit that ends it repeats only its own padding (readers x quota - samples, < readers x micro-batch)."""
    by_epoch: dict[int, dict[tuple, Counter]] = defaultdict(lambda: defaultdict(Counter))
    last: dict[int, dict] = {}
    for b in batches:
        by_epoch[b["epoch"]][tuple(b["unit"])].update(b["ids"])
        last[b["epoch"]] = b
    finished = sorted(by_epoch)[:-1]                 # the last epoch may be unfinished when the run ends
    assert len(finished) >= 2, sorted(by_epoch)
    for epoch in finished:
        units = by_epoch[epoch]
        assert set().union(*units.values()) == set(range(60)), epoch
        for a, b in itertools.combinations(units, 2):
            assert not set(units[a]) & set(units[b]), (epoch, a, b)
        end = last[epoch]
        quota = 8 * -(-(-(-end["unit_samples"] // end["readers"])) // 8)
        assert sum(units[tuple(end["unit"])].values()) == end["readers"] * quota, (epoch, end)


def test_resume_on_other_world_sizes_and_zero_stages(tmp_path):
    shards = write_shards(tmp_path / "colours")       # 60 samples whose ids survive the crops
    common = TINY + [f"data.shards={shards}", "data.resampled=false", "schedule.stage_steps=[2,2,2,2,2]",
                     "schedule.warmup_steps=1", "run.log_every=1", "run.save_every=100"]
    runs, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    out = [f"run.out_dir={runs}"]
    # (ranks, ZeRO config, stop at step): every resume lands one step before a stage end.
    chain = [(2, "zero2", 1), (0, "zero2", 3), (2, "zero2", 5), (2, "zero3", 0)]
    previous = None
    for nproc, ds, stop in chain:
        steps = stop - (previous or 0) if stop else 0         # run.stop_after_steps counts this launch's steps
        tail = _launch(nproc, common + out + [f"deepspeed.config={ds}", f"run.stop_after_steps={steps}"], probe)
        if previous is not None:
            world, zero = max(nproc, 1), int(ds[4])
            assert "converting" in tail and "universal format" in tail
            _same(torch.load(probe / f"saved_{previous}.pt"), torch.load(probe / f"resumed_{previous}_w{world}_z{zero}.pt"))
        previous = stop
    for step in (1, 2, 3, 4, 5, 6, 8, 10):              # Adam's step count = optimizer steps, in every layout
        assert torch.load(probe / f"saved_{step}.pt")["steps"] == [step], step
    batches = [json.loads(line) for line in (probe / "batches.jsonl").read_text().splitlines()]
    assert len({b["launch"] for b in batches}) == len(chain)
    _epochs_are_whole(batches)
    # A block only where the reader layout changed (2 -> 1 -> 2 ranks; a ZeRO stage change keeps the readers),
    # the second one carried over from inside the first (a chain of two).
    blocks = [(b["launch"], tuple(b["unit"]), b["unit_samples"]) for b in batches if b["block"]]
    assert len(set(blocks)) == 2 and {unit[1] for _, unit, _ in blocks} == {1, 2}
    switches = [m["step"] for m in read_metrics(runs) if m.get("event") == "stage_switch"]
    assert switches == [2, 4, 6, 8]
    assert sorted(m["step"] for m in read_metrics(runs) if "loss" in m) == list(range(1, 11))
