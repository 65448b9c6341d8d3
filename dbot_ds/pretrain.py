r"""dbot-pretrain: dBOT pre-training of a ViT on DeepSpeed, all stages and teacher swaps in one run.

Demo on CPU (tiny ViT, generated shards, 2 short stages):
    dbot-pretrain --preset demo
    deepspeed --num_gpus 2 --module dbot_ds.pretrain --preset demo run.out_dir=runs/demo2
ViT-H/14 reference recipe on 4 nodes x 8 GPUs (see launch/):
    deepspeed --hostfile launch/hostfile --module dbot_ds.pretrain --preset vit_h \
        data.shards='/data/in1k/shard-{000000..001281}.tar' run.out_dir=/ckpt/dbot_vit_h
Overrides are section.key=value (e.g. optim.micro_batch=64 model.act_ckpt_every=1); lists are written
[a,b] (schedule.stage_steps=[4,4]) and cleared with []. Quote brace patterns so the shell leaves them alone.
--resume auto (default) continues from the newest complete checkpoint in run.out_dir.
run.stop_after_steps=N trains at most N optimizer steps in this invocation, then saves and stops: for time-boxed
jobs, running the same command again trains the next N steps.
optim.precision=auto (default, the demo's) trains in bf16 where the GPU or CPU runs it natively, else fp32; the
start line says which and why.
Before launching, --dry-run runs every check of a start (config, data, resume, stage plan; memory and, with --card,
days from dbot-plan) and exits 0 without training: same arguments, plus --dry-run.
Nothing here imports DeepSpeed until the config is valid: --help and config errors return at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dbot_ds.config import ConfigError, load_config, preset_names
from dbot_ds.model.flops import PEAK_TFLOPS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(prog="dbot-pretrain", description=first.split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest.strip())
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a shipped config: {', '.join(preset_names())}")
    src.add_argument("--config", help="a YAML config file (sections: model, teacher, schedule, optim, data, deepspeed, run)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in run.out_dir, if any), none, or a checkpoint folder")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="resume from a checkpoint whose files hold pickled objects beyond DeepSpeed's own (normally "
                        "refused, as unpickling them can run code); only for files you trust. Sizes and SHA-256 "
                        "are still checked")
    p.add_argument("--dry-run", action="store_true",
                   help="every check a run makes before its first step, then exit 0 (a failing one: 2, with the "
                        "run's own error): prints the resolved config as YAML, the data found (first samples "
                        "decoded), what --resume would do (checkpoint checked), the stage plan, memory per GPU "
                        "(dbot-plan) and with --card the days to train. Builds no DeepSpeed engine, trains nothing, "
                        "writes nothing into run.out_dir (but the sample counts of shards without manifest.json, as "
                        "a start does). Under a launcher every rank checks its own data share")
    p.add_argument("--card", choices=sorted(PEAK_TFLOPS), default=None,
                   help="with --dry-run: the GPU to predict the time to train on (dbot-plan --time's model at MFU "
                        "0.4); default: the GPU this runs on, if it is one of these")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)       # flags may come after overrides: ... data.shards=X --dry-run
    if args.card and not args.dry_run:
        p.error("--card goes with --dry-run")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Parse, build and train; returns the run folder. Raises ConfigError on bad input."""
    args = parse_args(argv)
    if not (args.preset or args.config or any(o.startswith("data.shards=") for o in args.overrides)):
        raise ConfigError("no --preset, --config or data.shards given. For the built-in demo (a tiny model on "
                          "generated images) run `dbot-pretrain --preset demo`; to train on your data give "
                          "--preset vit_b (or --config FILE) and data.shards='/data/in1k/shard-{000000..001281}.tar'")
    cfg = load_config(path=args.config, preset=args.preset, overrides=args.overrides)
    from dbot_ds.distributed.watchdog import Heartbeat, is_comm_failure
    from dbot_ds.train.trainer import Trainer  # imports DeepSpeed: only after the config is known to be valid
    try:
        if args.dry_run:   # the checks of a start, then exit: no engine, no training (dbot_ds/train/dry_run.py)
            from dbot_ds.train.dry_run import dry_run
            return dry_run(cfg, resume=args.resume, trust_checkpoint=args.trust_checkpoint, card=args.card)
        trainer = Trainer(cfg, resume=args.resume, trust_checkpoint=args.trust_checkpoint)
        run_dir = trainer.fit()
    except Exception as e:
        if is_comm_failure(e) and Heartbeat.current is not None:
            raise Heartbeat.current.lost(e) from e
        raise
    if trainer.rank == 0:
        print(f"[dbot] done: step {trainer.step}/{trainer.plan.total_steps}; run folder: {run_dir.resolve()}", flush=True)
    from dbot_ds.distributed.groups import cleanup
    cleanup()
    return run_dir


def cli(argv: list[str] | None = None) -> int:
    from dbot_ds.checkpoint.safety import CheckpointRefused
    from dbot_ds.checkpoint.storage import StorageError
    from dbot_ds.distributed.watchdog import LostRank
    from dbot_ds.train.guards import TrainingDiverged
    try:
        main(argv)
    except CheckpointRefused as e:        # a ConfigError, but not about the config
        print(f"dbot-pretrain: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"dbot-pretrain: config error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"dbot-pretrain: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"dbot-pretrain: {e}", file=sys.stderr)
        return 3
    except LostRank as e:
        print(f"dbot-pretrain: {e}", file=sys.stderr)
        os._exit(4)           # a clean exit would wait in torch.distributed's teardown for the lost rank
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
