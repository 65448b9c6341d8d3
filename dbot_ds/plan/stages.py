"""The bootstrapped-teacher schedule as pure functions of the global step.

A run is a sequence of stages. `step` counts optimizer steps from 0 over the whole run; stage s covers
steps [starts[s], starts[s] + lengths[s]). Each stage has its own teacher depth and its own LR curve
(linear warmup from 0, then half-cycle cosine to min_lr), restarted at the stage's first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

from dbot_ds.config import Config, ConfigError


def peak_lr(blr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = blr x global_batch / 256."""
    return blr * global_batch / 256


def teacher_depths(init_depth: int, student_depth: int, num_stages: int) -> list[int]:
    """Stage 0 uses `init_depth`; every later teacher is the previous stage's student: [init] + [depth] * (n - 1)."""
    return [init_depth] + [student_depth] * (num_stages - 1)


def lr_at(step_in_stage: int, *, peak: float, min_lr: float, warmup_steps: int, stage_steps: int) -> float:
    """LR of one stage's step: peak * t / warmup during warmup, then cosine from peak to min_lr at stage end."""
    if step_in_stage < warmup_steps:
        return peak * step_in_stage / warmup_steps
    progress = (step_in_stage - warmup_steps) / max(1, stage_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StagePlan:
    """Stage lengths and per-stage settings, all in optimizer steps."""
    lengths: tuple[int, ...]
    teacher_depths: tuple[int, ...]
    warmup_steps: int
    peak_lr: float
    min_lr: float

    @property
    def num_stages(self) -> int:
        return len(self.lengths)

    @property
    def total_steps(self) -> int:
        return sum(self.lengths)

    @property
    def starts(self) -> tuple[int, ...]:
        return (0,) + tuple(accumulate(self.lengths))[:-1]

    def locate(self, step: int) -> tuple[int, int]:
        """Global step -> (stage, step within stage); at or past the end -> (num_stages, 0)."""
        for stage, (start, length) in enumerate(zip(self.starts, self.lengths)):
            if step < start + length:
                return stage, step - start
        return self.num_stages, 0

    def lr(self, step: int) -> float:
        stage, t = self.locate(step)
        if stage == self.num_stages:
            return self.min_lr
        return lr_at(t, peak=self.peak_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     stage_steps=self.lengths[stage])

    def is_stage_end(self, steps_done: int) -> bool:
        """True when `steps_done` steps complete a stage (the swap happens here, except after the last stage)."""
        return steps_done in set(accumulate(self.lengths))


def make_plan(cfg: Config, steps_per_epoch: float) -> StagePlan:
    """Turn the schedule config (epochs or steps) into a StagePlan; epochs use `steps_per_epoch`."""
    s = cfg.schedule
    if s.stage_epochs:
        if steps_per_epoch <= 0:
            raise ConfigError("stages are given in epochs but an epoch has 0 steps: the dataset is smaller than "
                              "optim.global_batch; set data.num_samples or schedule.stage_steps")
        lengths = [round(e * steps_per_epoch) for e in s.stage_epochs]
        warmup = round(s.warmup_epochs * steps_per_epoch) if s.warmup_epochs else s.warmup_steps
    else:
        lengths, warmup = list(s.stage_steps), s.warmup_steps
    if min(lengths) <= 0:
        raise ConfigError(f"a stage rounds to 0 steps ({lengths}); lengthen the stages")
    if warmup >= min(lengths):
        raise ConfigError(f"warmup ({warmup} steps) must be shorter than every stage ({lengths} steps)")
    depths = teacher_depths(cfg.teacher.init_depth, cfg.model.depth, len(lengths))
    return StagePlan(tuple(lengths), tuple(depths), warmup, peak_lr(cfg.optim.blr, cfg.optim.global_batch),
                     cfg.optim.min_lr)
