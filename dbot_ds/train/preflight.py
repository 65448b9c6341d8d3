"""What a run checks before DeepSpeed, in the order a start runs it: the batch arithmetic, the process group (from
torch only), the precision, the run folder, the dataset, the stage plan, the loader, the kNN monitor's set, the
teacher's files and the DeepSpeed config; and (`_check_checkpoint`) whether a resumed checkpoint fits this run.

The Trainer is a Preflight that goes on to build DeepSpeed and train (trainer.py); `dbot-pretrain --dry-run` is
one that stops here and reports (dry_run.py). One code path, so a dry run checks exactly what a start checks, and
a real start runs these steps in the order (and so with the RNG and data) it always did.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dbot_ds.checkpoint import store as ckpt
from dbot_ds.checkpoint.resume import check_resume, geometry, requested_tag
from dbot_ds.checkpoint.storage import probe_writable, raise_together
from dbot_ds.config import Config, ConfigError, grad_accum_steps
from dbot_ds.data.augment import Augment
from dbot_ds.data.dataset import resolve_dataset, resolve_eval_shards
from dbot_ds.data.epochs import StreamState
from dbot_ds.data.stream import build_train_loader, mix_seed
from dbot_ds.distributed.engine import build_ds_config, zero_stage
from dbot_ds.distributed.groups import init_process_group, world_size_from_env
from dbot_ds.distributed.watchdog import Heartbeat
from dbot_ds.plan.stages import StagePlan, make_plan
from dbot_ds.teachers.sources import external_teacher

from . import precision
from .monitor import KnnMonitor


class Preflight:
    """A run up to (not including) DeepSpeed: everything checked, nothing trained. Holds the process group, the
    resolved precision, dataset, stage plan, stream position {step, samples_seen, stream}, monitor and teacher
    weights from elsewhere, and the ZeRO stage; `resume_dir` / `resume_tag` name what `--resume` asked for."""

    def __init__(self, cfg: Config, resume: str = "auto", trust_checkpoint: bool = False):
        self.cfg = cfg
        self.trust_checkpoint = trust_checkpoint      # skip the pickle scan of the resumed tag (checkpoint/safety.py)
        grad_accum_steps(cfg, world_size_from_env())       # batch arithmetic error before anything is built
        self.rank, self.world, self.device = init_process_group(cfg.run.collective_timeout_s)
        self.heartbeat = Heartbeat(self.rank, self.world, interval_s=min(10.0, cfg.run.collective_timeout_s / 4))
        self.accum = grad_accum_steps(cfg, self.world)
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dtype = self._choose_precision(resume)
        self._probe_run_dir()                              # read-only / full: one line
        self.dataset = resolve_dataset(cfg, self.rank, self.run_dir)
        self.pattern = self.dataset.pattern
        if self.rank == 0:
            print(f"[dbot] {self.dataset.describe()}", flush=True)
            if size := self._teacher_view_size():
                print(f"[dbot] data: each crop also gives the teacher's own {size} px view (teacher.input_size; "
                      f"bicubic from the crop, as the reference's second_input_size)", flush=True)
        self.step, self.samples_seen = 0, 0
        self.skipped, self.skipped_base, self.skipped_total = 0, 0, 0   # this process's / at resume / all ranks
        self.stream = StreamState.fresh(geometry(cfg, self.world))      # exact epochs: the data position
        try:   # bad data settings fail here, before the engine is built: missing shards, too few shards
            self.plan: StagePlan = make_plan(cfg, self._steps_per_epoch())
            self._loader()
            self.monitor = self._build_monitor()     # labelled kNN set decoded and checked before the engine
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from e
        self.external, self.teacher_dim = None, cfg.model.embed_dim     # teacher files read and checked here too
        if cfg.teacher.source != "bootstrap":          # weights from elsewhere: the predictor follows its width
            self.external, self.teacher_dim = external_teacher(cfg)
        self.zstage = zero_stage(build_ds_config(cfg, self.world))   # the DeepSpeed JSON checked (no DeepSpeed yet)

    def _probe_run_dir(self) -> None:
        """The run folder is created and written to (a small file, removed): read-only or full fails here."""
        raise_together(probe_writable(self.run_dir) if self.rank == 0 else None)

    def _choose_precision(self, resume: str) -> torch.dtype:
        """Resolve optim.precision (auto: what this device runs natively, or a resumed checkpoint's own) into the
        config, so config.yaml and every checkpoint record what the run trains in; say which and why."""
        self.resume_dir, self.resume_tag = requested_tag(resume, self.ckpt_dir)
        meta = ckpt.read_meta(self.resume_dir, self.resume_tag) if self.resume_tag else None
        choice = precision.for_run(self.cfg.optim.precision, self.device, meta, self.resume_tag)
        self.cfg.optim.precision = choice.precision
        if self.rank == 0:
            print(f"[dbot] precision: {choice.precision} ({choice.reason})", flush=True)
            if choice.warning:
                print(f"[dbot] warning: {choice.warning}", file=sys.stderr, flush=True)
        return precision.dtype(choice.precision)

    def _build_monitor(self) -> KnnMonitor | None:
        if not self.cfg.eval.shards:
            return None
        monitor = KnnMonitor(self.cfg, resolve_eval_shards(self.cfg, self.rank), self.rank, self.world, self.device,
                             self.dtype)
        if self.rank == 0:
            print(f"[dbot] {monitor.describe()}", flush=True)
        return monitor

    def _check_checkpoint(self) -> None:
        """The resumed tag against this run, before any engine exists: config, data layout and stage plan
        (check_resume; it may hand back the checkpoint's own plan), then every file's size, SHA-256 and pickle
        scan (a collective over torch's process group alone)."""
        meta = ckpt.read_meta(self.resume_dir, self.resume_tag)
        self.plan = check_resume(self.cfg, meta, self.world, self.zstage, self.resume_tag, self.plan, self.dataset)
        ckpt.verify(self.resume_dir, self.resume_tag, self.trust_checkpoint)   # hashes + pickle scan

    def _steps_per_epoch(self) -> int:
        """N // global_batch in both data modes, as the reference's drop-last loader: the presets' epochs give the
        reference's step count and LR curve. An exact-epoch pass over the data is slightly longer (each reader's
        share is rounded up to whole micro-batches, docs/data.md), so passes and schedule epochs drift apart by
        that padding (2.3% with 32 ranks x 10 workers x 128 on ImageNet-1K)."""
        return self.dataset.num_samples // self.cfg.optim.global_batch

    def _loader(self):
        """The data stream from the current step. Resampled: reseeded by (seed, step). Exact epochs: one seed
        for the run, positioned after the micro-batches this rank already consumed."""
        d = self.cfg.data
        seed, start = ((mix_seed(self.cfg.run.seed, self.step), 0) if d.resampled
                       else (self.cfg.run.seed, self.stream.batches))
        return build_train_loader(self.pattern, img_size=self.cfg.model.img_size,
                                  micro_batch=self.cfg.optim.micro_batch, num_workers=d.num_workers, seed=seed,
                                  rank=self.rank, world_size=self.world,
                                  resampled=d.resampled, shuffle_buffer=d.shuffle_buffer, start_batch=start,
                                  manifest=self.dataset.manifest, stall_timeout_s=d.stall_timeout_s,
                                  spec=self.stream.spec, open_shards=d.open_shards,
                                  augment=self._augment(), teacher_size=self._teacher_view_size())

    def _teacher_view_size(self) -> int:
        """teacher.input_size when it differs from the student's: the loader then cuts the teacher's own view from
        each crop (the reference's second_input_size) instead of the teacher resizing the student's view."""
        size = self.cfg.teacher.input_size
        return size if size and size != self.cfg.model.img_size else 0

    def _augment(self) -> Augment:
        """The training augmentation of data.crop_scale, data.hflip, data.interpolation, data.color_jitter."""
        d = self.cfg.data
        return Augment(tuple(d.crop_scale), d.hflip, d.interpolation, d.color_jitter)
