"""Under `deepspeed --num_gpus 2`: train a few steps with a CLIP teacher, then compare the teacher's targets on
one batch with what transformers computes in fp32 for the same images; write per-rank JSON."""
import json
import sys

import torch
import torch.distributed as dist

from dbot_ds.config import load_config
from dbot_ds.data.augment import normalize
from dbot_ds.train.trainer import Trainer


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, overrides = args[0], args[1:]
    trainer = Trainer(load_config(preset="demo", overrides=overrides), resume="none")
    trainer.fit()
    from testkit import clip_reference
    from transformers import CLIPVisionModel
    x = normalize(next(trainer._batches())[0])
    with torch.no_grad():
        target = trainer.teacher(x.to(trainer.dtype)).float()
        ref = clip_reference(CLIPVisionModel.from_pretrained(trainer.cfg.teacher.weights).eval(), x)
    losses = [json.loads(l)["loss"] for l in open(trainer.run_dir / "metrics.jsonl") if '"loss"' in l]
    r = {"target_shape": list(target.shape), "max_abs_diff": (target - ref).abs().max().item(),
         "target_std": ref.std().item(), "predictor_out": trainer.engine.module.predictor.out_features, "losses": losses}
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(r, f)
    dist.barrier()


if __name__ == "__main__":
    main()
