"""Run under a real launcher (`deepspeed --num_gpus 2 tests/dist_probe.py OUT.json overrides...`): trains the
tiny model through a stage end and records, per rank, what the tests in test_distributed.py assert:
- at the swap: the gathered teacher weights vs the student's low-precision encoder weights just before it;
  the student's weights after it vs a fresh init; AdamW moments before/after;
- a fixed-batch loss at the start and the end of stage 1;
- a digest of the gathered student and teacher weights at the end (compared across ranks);
- the teacher's parameter bytes held by this rank.
"""
from __future__ import annotations

import hashlib
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from dbot_ds.config import load_config
from dbot_ds.data.augment import normalize
from dbot_ds.distributed.engine import adam_moments, full_fp32_state
from dbot_ds.model.objective import dbot_loss
from dbot_ds.model.vit import build_student
from dbot_ds.train.trainer import Trainer, mix_seed


def gathered_student(engine) -> dict[str, torch.Tensor]:
    """The low-precision weights the student's forward uses, full size, on every rank."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {k: p.detach().float().cpu().clone() for k, p in params.items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()


class ProbeTrainer(Trainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.record: dict = {"fixed_loss": {}}
        self.fixed_batch = None

    def fixed_loss(self) -> float:
        """Loss on one fixed batch with a fixed mask seed (eval mode: no drop-path)."""
        if self.fixed_batch is None:
            self.fixed_batch = normalize(next(self._batches())[0].to(self.device), self.dtype)
            self.data_iter = None
        self.engine.module.eval()
        with torch.no_grad():
            torch.manual_seed(1234)
            target = self.teacher(self.fixed_batch)
            pred, mask = self.engine(self.fixed_batch)
            loss = dbot_loss(pred, target, mask)
        self.engine.module.train()
        return float(loss)

    def _swap(self, next_stage: int, encoder: dict) -> None:
        names = [n for n, _ in self.engine.module.named_parameters()][:4]
        before = gathered_student(self.engine)
        moments_before = adam_moments(self.engine, names)
        super()._swap(next_stage, encoder)
        after = gathered_student(self.engine)
        moments_after = adam_moments(self.engine, names)
        master = full_fp32_state(self.engine)
        teacher = self.teacher.full_state()
        fresh = dict(build_student(self.cfg.model, seed=mix_seed(self.cfg.run.seed, next_stage)).named_parameters())
        enc = {k[len("encoder."):]: v for k, v in before.items() if k.startswith("encoder.")}
        r = self.record
        r["teacher_depth"] = self.teacher.depth
        r["teacher_keys"] = sorted(teacher)
        r["teacher_equals_student_max_abs"] = max((teacher[k].float() - enc[k]).abs().max().item() for k in teacher)
        r["student_changed_frac"] = sum(int(not torch.equal(before[k], after[k])) for k in after) / len(after)
        r["student_equals_fresh_max_abs"] = max(
            (after[k] - fresh[k].detach().to(self.dtype).float()).abs().max().item() for k in after)
        r["master_equals_fresh_max_abs"] = max((master[k] - fresh[k].detach()).abs().max().item() for k in master)
        r["matrices_changed"] = all(not torch.equal(before[k], after[k]) for k in after if after[k].ndim >= 2)
        w = after["encoder.blocks.0.attn.qkv.weight"]
        r["qkv_std"] = w.std().item()
        r["qkv_xavier_std"] = (2.0 / (w.shape[0] + w.shape[1])) ** 0.5
        r["norm_weight_ones"] = bool(torch.all(after["encoder.blocks.0.norm1.weight"] == 1))
        r["moments_before_absmax"] = max(v.abs().max().item() for v in moments_before.values())
        r["moments_after_absmax"] = max(v.abs().max().item() for v in moments_after.values())
        r["moments_unchanged"] = all(torch.equal(moments_before[n], moments_after[n]) for n in names)
        r["fixed_loss"]["stage1_start"] = self.fixed_loss()

    def _train_step(self) -> None:
        if self.step == 0:
            self.record["fixed_loss"]["stage0_start"] = self.fixed_loss()
        super()._train_step()
        if self.step + 1 == self.plan.total_steps:
            self.record["fixed_loss"]["stage1_end"] = self.fixed_loss()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, overrides = args[0], args[1:]
    cfg = load_config(preset="demo", overrides=overrides)
    trainer = ProbeTrainer(cfg, resume="none")
    trainer.fit()
    r = trainer.record
    rank, world = dist.get_rank(), dist.get_world_size()
    r.update(rank=rank, world=world, zero_stage=trainer.zstage,
             student_digest=digest(gathered_student(trainer.engine)), teacher_digest=digest(trainer.teacher.full_state()),
             teacher_bytes_rank=trainer.teacher.param_bytes_per_rank(),
             teacher_bytes_full=sum(v.numel() * v.element_size() for v in trainer.teacher.full_state().values()))
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(r, f)
    dist.barrier()


if __name__ == "__main__":
    main()
