"""`dbot-pretrain` whose student gradients are made non-finite (loss left finite) at the global steps listed in
the environment variable DBOT_POISON_STEPS (1-based, comma-separated): what an overflow looks like to DeepSpeed.

    deepspeed --num_gpus 2 tests/skip_probe.py --preset demo ...   (same arguments as dbot-pretrain)
"""
from __future__ import annotations

import os
import sys

import torch

import dbot_ds.train.trainer
from dbot_ds.pretrain import cli

POISON = {int(s) for s in os.environ.get("DBOT_POISON_STEPS", "").split(",") if s}


class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class PoisonTrainer(dbot_ds.train.trainer.Trainer):
    def _build(self, tag):
        super()._build(tag)
        self.engine.module.register_forward_hook(self._poison)

    def _poison(self, module, inputs, output):
        if self.step + 1 in POISON and module.training:
            pred, mask = output
            return _NaNGrad.apply(pred), mask
        return output


if __name__ == "__main__":
    dbot_ds.train.trainer.Trainer = PoisonTrainer
    raise SystemExit(cli([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
