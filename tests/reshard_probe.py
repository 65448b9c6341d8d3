"""`dbot-pretrain` that also dumps the optimizer's full state (fp32 master weights, Adam moments, step counts)
right after each checkpoint it writes (`OUT/saved_<step>.pt`) and right after it resumes
(`OUT/resumed_<step>_w<world>_z<stage>.pt`), so a test can compare them across layouts exactly. With exact
epochs it also appends each micro-batch it trains on to `OUT/batches.jsonl` (launch, rank, step, the epoch and
the unit of the stream it belongs to, sample ids read from the colours of tests/test_loader.py's shards). OUT is the environment
variable DBOT_PROBE_OUT.

    deepspeed --num_gpus 2 tests/reshard_probe.py --preset demo ...   (same arguments as dbot-pretrain)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state
from testkit import ids_of

import dbot_ds.train.trainer
from dbot_ds.data.epochs import block_units
from dbot_ds.data.manifest import shard_counts
from dbot_ds.distributed.engine import _link_optimizer_state, full_fp32_state
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


class ProbeTrainer(dbot_ds.train.trainer.Trainer):
    def _dump(self, name: str) -> None:
        state = optimizer_state(self.engine)
        state.update(step=self.step, stage=self.plan.locate(self.step)[0], lr=self.plan.lr(self.step))
        if dist.get_rank() == 0:
            torch.save(state, os.path.join(OUT, name))

    def _build(self, tag):
        super()._build(tag)
        if tag is not None:
            self._dump(f"resumed_{self.step}_w{self.world}_z{self.zstage}.pt")

    def _loader(self):
        loader = super()._loader()
        if self.cfg.data.resampled:
            return loader
        spec, launch = self.stream.spec, os.getpid() if dist.get_rank() == 0 else None
        launch = [launch]
        dist.broadcast_object_list(launch)             # one id per launch, the same on every rank
        block = block_units(spec, shard_counts(self.pattern, self.dataset.manifest), self.cfg.run.seed)

        def recorded():
            for images, info in loader:
                in_block = bool(block) and info.unit == 0
                epoch = spec["first_epoch"] + info.unit - len(block)
                unit = list(block[0].key) if in_block else [epoch]        # one id per unit of the stream
                samples = block[0].samples if in_block else self.dataset.num_samples
                with open(os.path.join(OUT, "batches.jsonl"), "a") as f:
                    f.write(json.dumps({"launch": launch[0], "rank": self.rank, "step": self.step, "epoch": epoch,
                                        "block": in_block, "unit": unit, "unit_samples": samples,
                                        "readers": self.stream.geometry.readers, "ids": ids_of(images)}) + "\n")
                yield images, info
        return recorded()

    def _save(self, stage_end):
        super()._save(stage_end)
        self._dump(f"saved_{self.step}.pt")


if __name__ == "__main__":
    dbot_ds.train.trainer.Trainer = ProbeTrainer
    raise SystemExit(cli([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
