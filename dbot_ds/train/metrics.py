"""Run metrics: one JSON object per log step in metrics.jsonl, optional TensorBoard and Weights & Biases
(wandb_sink.py), and on rank 0 a progress bar on a terminal or plain log lines when the output goes to a file.

After a resume, metrics.jsonl keeps only the records up to the resumed step (the steps after it are trained
again and logged anew), then a `resumed` event: each step appears once. `read_metrics` reads the file.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` in order (log records have `loss`; events have `event`)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (trained again after a resume); atomic rewrite."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, progress: bool, tensorboard: bool,
                 resumed: dict | None = None, wandb_config: dict | None = None):
        """wandb_config: the resolved config (`cfg.to_dict()`) to log a W&B run with; None: no W&B."""
        self.enabled = rank == 0
        self.total_steps = total_steps
        if self.enabled:     # a fresh start (step 0) drops the records of an attempt killed before any checkpoint
            _truncate_after(run_dir / "metrics.jsonl", start_step)
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        # A bar redrawn with \r is one endless line in a log file: plain lines there instead.
        self.lines = self.enabled and progress and not sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (self.enabled and progress) or self.lines,
                        dynamic_ncols=True, unit="step", mininterval=2.0)
        self.knn: str | None = None          # the last student kNN top-1 (mean-pooled), shown with the loss
        self.tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = None
        if self.enabled and wandb_config is not None:
            from .wandb_sink import WandbSink
            self.wandb = WandbSink(run_dir, wandb_config, resumed=resumed is not None)
        if resumed:
            self.event("resumed", **resumed)

    def step(self) -> None:
        self.bar.update(1)

    def log(self, record: dict) -> None:
        """A metrics record (plain Python numbers only: reductions happen before this)."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if "loss" in record:
            self._show(record)
        if self.tb is not None and "event" not in record:        # events: their own scalars, if any (eval_record)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:                               # log records, eval and other events
            self.wandb.log(record)

    def _show(self, r: dict) -> None:
        fields = {"stage": r["stage"], "loss": f"{r['loss']:.4f}", "lr": f"{r['lr']:.2e}", "img_s": f"{r['img_per_s']:.0f}"}
        if r.get("skipped_steps"):
            fields["skipped"] = r["skipped_steps"]
        if self.knn is not None:
            fields["knn"] = self.knn
        if self.lines:
            print(f"[dbot] step {r['step']}/{self.total_steps} " + " ".join(f"{k}={v}" for k, v in fields.items()),
                  file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix(**fields)

    def eval_record(self, record: dict) -> None:
        """A monitor result {"stage", "step", "model", "knn_top1_mean", ...}: an `eval` event in metrics.jsonl,
        TensorBoard scalars eval/<model>/<metric>, and the student's top-1 on the progress bar."""
        if not self.enabled:
            return
        self.event("eval", **record)
        if record["model"] == "student":
            self.knn = f"{record['knn_top1_mean']:.1f}"
        if self.tb is not None:
            for k, v in record.items():
                if k.startswith("knn_") or k == "seconds":
                    self.tb.add_scalar(f"eval/{record['model']}/{k}", v, record["step"])

    def event(self, name: str, **fields) -> None:
        self.log({"event": name, **fields})
        if self.enabled:
            self.bar.write(f"[dbot] {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.close()
