"""Stopping a run that no longer trains: non-finite losses and optimizer steps that DeepSpeed skipped.

Both are checked at the trainer's sync points (log steps, checkpoints, stage ends), which always come before a
save, so a diverged state is never checkpointed and `--resume auto` restarts from the last good one.

Skipped steps: under bf16 there is no loss scaling, so DeepSpeed skips an optimizer step only when the gradients
hold inf/NaN (ZeRO-1/2 with `bf16.check_grad_overflow`, ZeRO-3 always). The skip decision is already on the host
inside DeepSpeed (it all-reduces the overflow flag and reads it), and `engine.skipped_steps` is a plain int that
every rank agrees on, so counting costs no extra device sync. An isolated skip is logged and training goes on;
`optim.max_skipped_in_row` consecutive skips, or `optim.max_skipped_frac` of a log window (at least 2 skips), stop
the run.
"""
from __future__ import annotations

from dbot_ds.plan.stages import StagePlan


class TrainingDiverged(RuntimeError):
    """The run stopped because it no longer trains; raised on every rank, before any checkpoint. Exit code 3."""


class NonFiniteLoss(TrainingDiverged):
    """The loss became NaN/inf."""


class TooManySkippedSteps(TrainingDiverged):
    """DeepSpeed skipped too many optimizer steps (non-finite gradients)."""


def where(plan: StagePlan, step: int) -> str:
    """'stage S, step T of the stage (global step G)' for a 1-based global step."""
    stage, t = plan.locate(step - 1)
    return f"stage {stage}, step {t + 1} of the stage (global step {step})"


class SkippedSteps:
    """Follows DeepSpeed's cumulative `skipped_steps` after every optimizer step (host ints only)."""

    def __init__(self, max_in_row: int, max_frac: float, skipped_so_far: int):
        self.max_in_row, self.max_frac = max_in_row, max_frac
        self.total = skipped_so_far          # over the whole run (DeepSpeed restores it from a checkpoint)
        self.in_row, self.row_start = 0, 0   # the current run of consecutive skips and its first step
        self.window, self.window_first = 0, 0

    def update(self, step: int, engine_skipped: int) -> None:
        """After optimizer step `step` (1-based), given DeepSpeed's cumulative skip count."""
        if engine_skipped == self.total:
            self.in_row = 0
            return
        self.total = engine_skipped
        self.in_row += 1
        self.row_start = self.row_start if self.in_row > 1 else step
        self.window += 1
        self.window_first = self.window_first or step

    def verdict(self, window_steps: int, plan: StagePlan) -> str | None:
        """The reason to stop, or None. Call at a sync point, then `reset_window()`."""
        if self.max_in_row and self.in_row >= self.max_in_row:
            return (f"DeepSpeed skipped {self.in_row} optimizer steps in a row, from {where(plan, self.row_start)}: "
                    "the gradients were non-finite, so the weights were not updated")
        if self.max_frac and self.window >= 2 and self.window >= self.max_frac * window_steps:
            return (f"DeepSpeed skipped {self.window} of the last {window_steps} optimizer steps, the first at "
                    f"{where(plan, self.window_first)}: the gradients were non-finite, so the weights were not updated")
        return None

    def reset_window(self) -> None:
        self.window, self.window_first = 0, 0
