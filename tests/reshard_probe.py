"""`dbot-pretrain` that also dumps the optimizer's full state (fp32 master weights, Adam moments, step counts)
right after each checkpoint it writes (`OUT/saved_<step>.pt`) and right after it resumes
(`OUT/resumed_<step>_w<world>_z<stage>.pt`), so a test can compare them across layouts exactly. OUT is the
environment variable DBOT_PROBE_OUT.

    deepspeed --num_gpus 2 tests/reshard_probe.py --preset demo ...   (same arguments as dbot-pretrain)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state

import dbot_ds.trainer
from dbot_ds.engine import _link_optimizer_state, full_fp32_state
from dbot_ds.pretrain import cli

OUT = os.environ.get("DBOT_PROBE_OUT", "")


def optimizer_state(engine) -> dict:
    """Every parameter's fp32 master, exp_avg and exp_avg_sq (full, on every rank; a collective) and the step
    counts of the wrapped torch optimizer."""
    _link_optimizer_state(engine)
    out = {f"{k}/fp32": v for k, v in full_fp32_state(engine).items()}
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).float().cpu().clone()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out["steps"] = sorted({int(s["step"]) for s in inner.state.values() if "step" in s})
    return out


class ProbeTrainer(dbot_ds.trainer.Trainer):
    def _dump(self, name: str) -> None:
        state = optimizer_state(self.engine)
        state.update(step=self.step, stage=self.plan.locate(self.step)[0], lr=self.plan.lr(self.step))
        if dist.get_rank() == 0:
            torch.save(state, os.path.join(OUT, name))

    def _build(self, tag):
        super()._build(tag)
        if tag is not None:
            self._dump(f"resumed_{self.step}_w{self.world}_z{self.zstage}.pt")

    def _save(self, stage_end):
        super()._save(stage_end)
        self._dump(f"saved_{self.step}.pt")


if __name__ == "__main__":
    dbot_ds.trainer.Trainer = ProbeTrainer
    raise SystemExit(cli([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
