"""Run metrics: one JSON object per log step in metrics.jsonl, optional TensorBoard, a progress bar on rank 0."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, progress: bool, tensorboard: bool):
        self.enabled = rank == 0
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (self.enabled and progress),
                        dynamic_ncols=True, unit="step", mininterval=2.0)
        self.tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

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
            extra = {"skipped": record["skipped_steps"]} if record.get("skipped_steps") else {}
            self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_s']:.0f}", **extra)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])

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
