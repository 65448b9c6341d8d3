"""`dbot-bench repro`: the paper's two claims in miniature, on a real labelled dataset a CPU can handle.

    dbot-bench repro --out /tmp/repro                  # 3 seeds x 2 stages x 1000 steps of 128 images, fp32
    dbot-bench repro --out /tmp/repro --rescore        # score the trained seeds again, train nothing

Data: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes; `dbot-shards digits`), upsampled to
32 px: 1,437 train images (pre-training, kNN bank, probe training) and 360 held-out val images (queries).
Model: the demo preset's tiny ViT (width 96, depth 4, patch 4), 2 stages, run by the real trainer
(`dbot-pretrain`, one process, fp32). The regime (REGIME below): 1000 steps a stage at batch 128 (about 90
epochs of the 1,437 images) in exact epochs, a random stage-0 teacher as deep as the student
(`teacher.init_depth` = depth), milder crops (area 0.35-1, bilinear, no flip): the regime in which an independent
minimal loop showed both claims (issue 22). For each seed, three encoders are measured with `dbot-eval` (kNN k=20
T=0.07, and MAE's linear probe on cls and on mean-pooled features):
- `init`: the random initial student encoder (what stage 0 starts from);
- `stage0`: the encoder at the end of stage 0 (distilled from the random teacher);
- `stage1`: the encoder at the end of stage 1 (distilled from the stage-0 encoder: one bootstrap).
Metrics: `knn_loo_*` is leave-one-out kNN over all 1,797 images (each image voted on by the other 1,796; the
1,437 train images among them were seen, without labels, in pre-training), the headline. Why: the difference of
two encoders' accuracies on n queries has a sampling sd of about sqrt(queries they classify differently) / n; for
encoders that disagree on one query in ten (an estimate, not a measurement) that is 1.7 points on the 360 val
queries and 0.7 on all 1,797. `knn_*` (bank train, queries val) and `linear_*` (probe trained on train, scored
on val) keep the held-out split.
The claims: stage0 beats init; stage1 beats stage0 (each by at least 2 standard deviations of the seeds, see
:func:`verdict`). The last line is one JSON object with every number; a markdown table of mean +- std over the
seeds and the verdict go to stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from dbot_ds.bench.repro_loop import ABLATIONS

ENCODERS = ("init", "stage0", "stage1")
METRICS = ("knn_loo_top1_mean", "knn_loo_top1_cls", "knn_top1_mean", "knn_top1_cls", "linear_top1_mean",
           "linear_top1_cls")
DIGITS_TRAIN = 1437                   # images in `dbot-shards digits --split train`
# The miniature's regime, on top of the demo preset (dbot-pretrain overrides after `--` win over these): fp32, a
# random stage-0 teacher as deep as the student (the demo's depth 4), milder crops, and exact epochs with a
# shuffle buffer as large as the train split (every image once per epoch, in a fresh order: the reference's
# DistributedSampler, and the plain loop's randperm).
REGIME = ["optim.precision=fp32", "teacher.init_depth=4", "data.crop_scale=[0.35,1.0]", "data.hflip=false",
          "data.interpolation=bilinear", "data.resampled=false", f"data.shuffle_buffer={DIGITS_TRAIN}"]


def _run_overrides(train: Path, val: Path, out: Path, seed: int, stage_steps: int, batch: int,
                   extra: list[str]) -> list[str]:
    return [f"data.shards={train}", "data.synthetic_num=0", f"eval.shards={train}", f"eval.query_shards={val}",
            "eval.synthetic_num=0", "eval.every_steps=0", "schedule.stage_epochs=[]",
            f"schedule.stage_steps=[{stage_steps},{stage_steps}]", f"schedule.warmup_steps={max(1, stage_steps // 20)}",
            f"optim.global_batch={batch}", f"optim.micro_batch={batch}", f"run.seed={seed}", f"run.out_dir={out}",
            "run.save_every=1000000", "run.progress=false", *_without(REGIME, extra), *extra]


def _without(regime: list[str], extra: list[str]) -> list[str]:
    """The regime's overrides that `extra` does not set itself (dbot-pretrain refuses a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [r for r in regime if r.split("=", 1)[0] not in keys]


def _write_init_encoder(overrides: list[str], out: Path) -> None:
    """The run's initial student encoder (the same seed as the trainer's) as out/init."""
    from dbot_ds.bench.repro_loop import initial_student
    from dbot_ds.config import load_config
    initial_student(load_config(preset="demo", overrides=overrides), out)


def _dbot_eval(argv: list[str]) -> dict:
    from dbot_ds.evaluate import cli as evaluate
    args = evaluate.parse_args(argv)
    return evaluate.evaluate(args, 0, 1, torch.device("cpu"))


def _train_minimal(overrides: list[str], train: Path, out: Path, ablate: str) -> None:
    """The two stages in the plain loop of bench/repro_loop.py instead of `dbot-pretrain`."""
    from dbot_ds.bench.repro_loop import train_two_stages
    from dbot_ds.config import load_config
    from dbot_ds.data.manifest import shard_pattern
    from dbot_ds.evaluate.knn import load_labelled
    cfg = load_config(preset="demo", overrides=overrides)
    images = load_labelled(shard_pattern(train), cfg.model.img_size, crop_pct=1.0).images   # whole 32 px images
    train_two_stages(cfg, images, out, ablate, shards=shard_pattern(train))


def _trained(run: Path) -> bool:
    return all((run / "stage_encoders" / name / "encoder.safetensors").is_file() for name in ENCODERS)


def measure_seed(digits: Path, out: Path, seed: int, stage_steps: int, batch: int, linear_epochs: int,
                 extra: list[str], loop: str = "trainer", ablate: str = "none", rescore: bool = False) -> dict:
    """Train one seed (unless `rescore` and its encoders are there) and score its init / stage0 / stage1."""
    run = out / f"seed{seed}"
    overrides = _run_overrides(digits / "train", digits / "val", run, seed, stage_steps, batch, extra)
    if rescore:
        if not _trained(run):
            raise SystemExit(f"--rescore: {run}/stage_encoders has no {', '.join(ENCODERS)} encoders to score; "
                             "run without --rescore to train them")
    elif loop == "minimal":
        _train_minimal(overrides, digits / "train", run / "stage_encoders", ablate)
    else:
        proc = subprocess.run([sys.executable, "-m", "dbot_ds.pretrain", "--preset", "demo", "--resume", "none",
                               *overrides], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"dbot-pretrain (seed {seed}) failed:\n{proc.stderr[-3000:]}")
        _write_init_encoder(overrides, run / "stage_encoders")
    sets = ["--train", str(digits / "train"), "--query", str(digits / "val")]
    result = {}
    for name in ENCODERS:
        enc = ["--encoder", str(run / "stage_encoders" / name)]
        knn = _dbot_eval(["knn", *enc, *sets])
        row = {k: v for k, v in knn.items() if k.startswith("knn_")}
        loo = _dbot_eval(["knn", *enc, "--train", str(digits / "all"), "--leave-one-out"])
        row.update({k.replace("knn_", "knn_loo_"): v for k, v in loo.items() if k.startswith("knn_")})
        for pool in ("cls", "mean"):
            lin = _dbot_eval(["linear", *enc, *sets, "--pool", pool, "--epochs", str(linear_epochs),
                              "--seed", str(seed)])
            row[f"linear_top1_{pool}"] = lin["linear_top1"]
        result[name] = row
    log = run / "metrics.jsonl"                   # the trainer's; the minimal loop has no monitor
    records = map(json.loads, log.read_text().splitlines()) if log.exists() else []
    keep = ("step", "stage", "model", "knn_top1_mean", "knn_top1_cls")
    result["monitor"] = [{k: r[k] for k in keep} for r in records if r.get("event") == "eval"]
    return result


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summary(per_seed: dict[int, dict]) -> str:
    """Markdown table: mean +- std over seeds of each metric for init / stage0 / stage1."""
    lines = ["| encoder | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in ENCODERS:
        cells = ["%.1f +- %.1f" % _mean_sd([r[name][m] for r in per_seed.values()]) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(per_seed: dict[int, dict], metric: str = "knn_top1_mean") -> dict:
    """Each claim on one metric: the gain of the mean over seeds, the larger of the two encoders' standard
    deviations over seeds, and whether gain >= 2 x that (shown). Also the smallest per-seed gain."""
    out = {}
    for claim, (lo, hi) in (("stage0_over_init", ("init", "stage0")), ("stage1_over_stage0", ("stage0", "stage1"))):
        (m_lo, sd_lo), (m_hi, sd_hi) = (_mean_sd([r[e][metric] for r in per_seed.values()]) for e in (lo, hi))
        sd = max(sd_lo, sd_hi)
        gains = [r[hi][metric] - r[lo][metric] for r in per_seed.values()]
        out[claim] = {"metric": metric, "gain": round(m_hi - m_lo, 2), "sd": round(sd, 2),
                      "min_seed_gain": round(min(gains), 2), "shown": m_hi - m_lo >= 2 * sd and min(gains) > 0}
    return out


def main(args: argparse.Namespace) -> int:
    from dbot_ds.data.digits import write_digits_shards
    out = Path(args.out)
    digits = out / "digits"
    for split in ("train", "val", "all"):
        if not (digits / split / "manifest.json").exists():
            write_digits_shards(digits / split, split=split)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = measure_seed(digits, out, seed, args.stage_steps, args.batch, args.linear_epochs,
                                      args.overrides, args.loop, args.ablate, args.rescore)
        print(f"[dbot-bench] repro seed {seed}: " + json.dumps({k: v for k, v in per_seed[seed].items()
                                                                if k != "monitor"}), file=sys.stderr)
    print(summary(per_seed), file=sys.stderr)
    claims = {m: verdict(per_seed, m) for m in METRICS}
    for metric, v in claims.items():
        print(f"[dbot-bench] {metric}: " + "; ".join(
            f"{claim} {c['gain']:+.1f} (sd {c['sd']:.1f}, smallest seed gain {c['min_seed_gain']:+.1f}): "
            f"{'shown' if c['shown'] else 'NOT shown'}" for claim, c in v.items()), file=sys.stderr)
    print(json.dumps({"bench": "repro", "loop": args.loop, "ablate": args.ablate,
                      "stage_steps": args.stage_steps, "batch": args.batch,
                      "regime": REGIME, "overrides": args.overrides, "linear_epochs": args.linear_epochs,
                      "claims": claims, "seeds": per_seed}))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("repro", help="the paper's claims in miniature on real digits (see bench/repro.py)")
    p.add_argument("--out", required=True, help="folder for the digits shards and the runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stage-steps", type=int, default=1000, help="optimizer steps of each of the 2 stages")
    p.add_argument("--batch", type=int, default=128, help="images per step (one process)")
    p.add_argument("--linear-epochs", type=int, default=50, help="linear-probe epochs")
    p.add_argument("--loop", choices=("trainer", "minimal"), default="trainer",
                   help="trainer: dbot-pretrain; minimal: the plain PyTorch loop of bench/repro_loop.py")
    p.add_argument("--ablate", choices=sorted(ABLATIONS), default="none",
                   help="with --loop minimal: one change against the trainer's settings (bench/repro_loop.py)")
    p.add_argument("--rescore", action="store_true",
                   help="score the seeds already trained under --out again (e.g. after a metric was added); "
                        "train nothing")
    p.add_argument("overrides", nargs="*", help="dbot-pretrain overrides (after --)")
    p.set_defaults(func=main)
