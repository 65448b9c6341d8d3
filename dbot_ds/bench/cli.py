r"""`dbot-bench`: throughput benchmarks for dbot-ds.

    dbot-bench fixture --out /tmp/benchfix --num 1200
    dbot-bench data --shards '/tmp/benchfix/shard-{000000..000004}.tar' --baseline-dir /tmp/benchfix/files \
        --workers 2 --steps 20 --batch 64
    dbot-bench step --arch vit_huge_patch14 --micro-batch 128 --zero zero2 --baseline     # see bench/step.py
    dbot-bench mix --out /tmp/benchmix --classes 20 --per-class 1000                      # class mixing
    dbot-bench monitor --steps 64 --every 16                                              # see bench/monitor.py
    dbot-bench repro --out /tmp/repro --seeds 0 1 2                                      # see bench/repro.py
    dbot-bench matmul                                         # fp32 vs bf16 on this CPU (optim.precision=auto)

`data` times our webdataset loader (:func:`dbot_ds.data.stream.build_train_loader` + :func:`~dbot_ds.data.augment.normalize`)
against the usual torchvision ImageFolder + DataLoader pipeline on the same JPEGs, with the same augmentation
(the data.* keys as flags), and prints a summary whose last line is one JSON object. Both sides skip unreadable
images and report how many they skipped.

`mix` writes class-sorted shards (one class per shard, as a plain tar per class gives) and reports the mean
number of distinct classes per micro-batch our loader delivers, for each `--open-shards` value.
"""
# The dispatcher: each subcommand's arguments and code live in its module (data.py: data and fixture, mix.py,
# step.py, fp8.py, ...); `python -m dbot_ds.bench` runs this too.

from __future__ import annotations

import argparse
import sys

from . import data as bench_data
from . import mix as bench_mix


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbot-bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    commands = parser.add_subparsers(dest="command", required=True)

    bench_data.add_command(commands)
    bench_mix.add_command(commands)
    bench_data.add_fixture_command(commands)

    p = commands.add_parser("step", help="training-step throughput, TFLOP/s, MFU and memory (see bench/step.py)")
    from . import step as bench_step
    bench_step.add_arguments(p)
    p.set_defaults(func=bench_step.main)

    from . import fp8 as bench_fp8
    from . import matmul as bench_matmul
    from . import memcheck as bench_memcheck
    from . import monitor as bench_monitor
    from . import repro as bench_repro
    from . import run as bench_run
    from . import sweep as bench_sweep
    bench_fp8.add_command(commands)
    bench_matmul.add_command(commands)
    bench_memcheck.add_command(commands)
    bench_monitor.add_command(commands)
    bench_run.add_command(commands)
    bench_repro.add_command(commands)
    bench_sweep.add_command(commands)

    args = parser.parse_args(argv)
    if args.command == "data" and (args.steps < 1 or args.batch < 1 or args.warmup < 0 or args.workers < 0):
        parser.error("need --steps >= 1, --batch >= 1, --warmup >= 0, --workers >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(cli())
