"""`dbot-bench monitor`: what the online kNN monitor costs the run it watches.

    dbot-bench monitor                                   # the demo preset, the kNN every 16 steps, 64 steps
    dbot-bench monitor --steps 96 --every 32 -- model.arch=vit_small_patch8 eval.max_images=2000

Runs `dbot-pretrain` (one process) with the monitor on, then reads its metrics.jsonl: the seconds of each
student evaluation (`eval` records) and the training seconds per step (the log records' img/s, which exclude the
evaluations). The monitor's share of a run's time is eval_s / (every_steps x step_s + eval_s); it is reported for
the measured setting and for the default `eval.every_steps` (1000), plus the two stage-end evaluations (student,
new teacher) spread over the stage. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from dbot_ds.config import EvalConfig
from dbot_ds.train.metrics import read_metrics


def share(eval_s: float, step_s: float, every: int) -> float:
    """Fraction of wall time spent evaluating when one evaluation of eval_s follows every `every` steps."""
    return eval_s / (every * step_s + eval_s)


def measure(steps: int, every: int, overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "dbot_ds.pretrain", "--preset", "demo", f"run.out_dir={out}",
           f"schedule.stage_steps=[{steps // 2},{steps - steps // 2}]", "schedule.warmup_steps=1",
           f"eval.every_steps={every}", f"run.log_every={every}", "run.save_every=100000", "run.progress=false",
           "--resume", "none", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dbot-pretrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    recs = read_metrics(out)
    evals = [r for r in recs if r.get("event") == "eval" and r["model"] == "student" and r["step"] > 0]
    logs = [r for r in recs if "loss" in r][1:]              # the first window holds start-up costs
    batch = yaml.safe_load((out / "config.yaml").read_text())["optim"]["global_batch"]   # as the run resolved it
    eval_s = sum(r["seconds"] for r in evals) / len(evals)
    step_s = sum(batch / r["img_per_s"] for r in logs) / len(logs)
    default = EvalConfig().every_steps
    stage_steps = steps // 2
    return {"bench": "monitor", "steps": steps, "every_steps": every, "eval_s": round(eval_s, 3),
            "step_s": round(step_s, 4), "num_evals": len(evals),
            "share_measured": round(share(eval_s, step_s, every), 4),
            "share_default_every": round(share(eval_s, step_s, default), 5), "default_every_steps": default,
            "stage_end_share_per_stage": round(2 * eval_s / (stage_steps * step_s), 4)}


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.steps, args.every, args.overrides, Path(tmp) / "run")
    print(f"[dbot-bench] monitor: {result['eval_s']} s per evaluation, {result['step_s']} s per training step; "
          f"share of the run: {100 * result['share_measured']:.2f}% every {args.every} steps, "
          f"{100 * result['share_default_every']:.3f}% at the default every {result['default_every_steps']} steps",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("monitor", help="the kNN monitor's share of a run's time (see bench/monitor.py)")
    p.add_argument("--steps", type=int, default=64, help="training steps (two stages of half each)")
    p.add_argument("--every", type=int, default=16, help="eval.every_steps of the measured run")
    p.add_argument("overrides", nargs="*", help="dbot-pretrain overrides (after --), e.g. eval.max_images=300")
    p.set_defaults(func=main)
