"""`dbot-bench run-summary RUN`: what a short real training run showed, from its metrics.jsonl.

    dbot-bench run-summary runs/gpu_vit_b --json summary.json

Per stage: median images/s per GPU and the mean data-wait fraction over the log windows after the stage's
first (which holds start-up, the shuffle buffer's fill and, in stage 1, the swap), the first and last loss;
and for the run: whether every loss is finite, the stage switches, skipped steps and samples, and the
monitor's kNN records. `launch/gpu_train.sh` prints it after its GPU run.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def summarise(metrics: Path) -> dict:
    """{'stages': {stage: {...}}, 'losses_finite', 'switches', 'skipped_steps', 'skipped_samples', 'eval', 'steps'}."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "event" not in r and "loss" in r]
    if not steps:
        raise SystemExit(f"{metrics}: no step records (did the run log? run.log_every)")
    stages = {}
    for stage in sorted({r["stage"] for r in steps}):
        mine = [r for r in steps if r["stage"] == stage]
        steady = mine[1:] or mine
        stages[stage] = {"windows": len(mine), "steady_windows": len(steady),
                         "img_per_s_per_gpu": statistics.median(r["img_per_s_per_gpu"] for r in steady),
                         "data_wait_frac": statistics.fmean(r["data_wait_frac"] for r in steady),
                         "data_wait_frac_max": max(r["data_wait_frac"] for r in steady),
                         "first_loss": mine[0]["loss"], "last_loss": mine[-1]["loss"],
                         "last_step": mine[-1]["step"]}
    return {"steps": steps[-1]["step"], "stages": stages,
            "losses_finite": all(math.isfinite(r["loss"]) for r in steps),
            "switches": [r for r in rows if r.get("event") == "stage_switch"],
            "skipped_steps": steps[-1].get("skipped_steps", 0), "skipped_samples": steps[-1].get("skipped_samples", 0),
            "eval": [{k: r[k] for k in ("stage", "step", "model", "knn_top1_cls", "seconds")}
                     for r in rows if r.get("event") == "eval"]}


def render(s: dict) -> str:
    lines = [f"{s['steps']} steps; losses finite: {s['losses_finite']}; skipped steps {s['skipped_steps']}, "
             f"skipped samples {s['skipped_samples']}; stage switches: "
             + (", ".join(f"step {w['step']} -> stage {w['to_stage']} (teacher depth {w['teacher_depth']})"
                          for w in s["switches"]) or "none"),
             "| stage | img/s/GPU (median) | data wait (mean / max) | loss first -> last | log windows (steady) |",
             "|---|---|---|---|---|"]
    for stage, r in s["stages"].items():
        lines.append(f"| {stage} | {r['img_per_s_per_gpu']:.0f} | {100 * r['data_wait_frac']:.1f}% / "
                     f"{100 * r['data_wait_frac_max']:.1f}% | {r['first_loss']:.4f} -> {r['last_loss']:.4f} | "
                     f"{r['windows']} ({r['steady_windows']}) |")
    for e in s["eval"]:
        lines.append(f"eval stage {e['stage']} step {e['step']} {e['model']}: kNN cls top-1 {e['knn_top1_cls']}, "
                     f"{e['seconds']} s")
    return "\n".join(lines)


def _cmd(a) -> int:
    s = summarise(Path(a.run) / "metrics.jsonl" if Path(a.run).is_dir() else Path(a.run))
    print(render(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    print(json.dumps(s))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("run-summary", help="img/s, data wait, losses and swaps of a run's metrics.jsonl")
    p.add_argument("run", help="run folder (or its metrics.jsonl)")
    p.add_argument("--json", help="also write the summary here")
    p.set_defaults(func=_cmd)
