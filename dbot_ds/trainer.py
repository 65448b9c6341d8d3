"""The dBOT training loop on DeepSpeed: all stages, teacher swaps and checkpoints in one run.

Determinism (what makes resume exact): the masking / drop-path RNG is reseeded from (seed, step, micro-step,
rank) before every forward. The data stream is either resampled and rebuilt from (seed, step) at the start of
the run and after every checkpoint, or (data.resampled=false) one seeded stream of exact epochs that a resumed
run re-enters at the micro-batch where it stopped. Either way a resumed run sees the same batches and masks as
one that never stopped.
No host sync per step: losses and the first non-finite step are accumulated on the device and reduced only at
log steps, stage ends and checkpoints.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_diff, dump_config, grad_accum_steps
from .data import build_train_loader, dataset_size, epoch_batches_per_rank, mix_seed, normalize, shard_counts
from .distributed import all_reduce_max, all_reduce_sum, barrier, init_distributed, world_size_from_env
from .engine import build_ds_config, full_fp32_state, init_student_engine, reset_adam, set_lr, write_student_weights, zero_stage
from .metrics import MetricsLogger
from .models import build_student
from .objective import dbot_loss
from .shards import shard_pattern, write_synthetic_shards
from .stages import StagePlan, make_plan
from .teacher import Teacher
from .teacher_sources import external_teacher

# Config keys a resumed run must share with its checkpoint (they change the model, batch or step -> stage map).
RESUME_KEYS = ["model.img_size", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
               "model.mlp_ratio", "model.decoder_embed_dim", "model.decoder_depth", "model.decoder_num_heads",
               "model.mask_ratio", "teacher.init_depth", "teacher.final_norm", "teacher.source", "teacher.layer",
               "optim.global_batch",
               "optim.precision", "schedule", "data.num_samples", "run.seed"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; raised on every rank at the next sync point, before any checkpoint."""


def resolve_shards(cfg: Config, rank: int) -> str:
    """The shard pattern. A folder with a manifest.json may be given instead; with data.synthetic_num > 0 a
    missing folder is filled with generated images first (rank 0 writes, the others wait)."""
    d = cfg.data
    if not d.shards:
        raise ConfigError("data.shards is empty: set it to a shard pattern (e.g. /data/in1k/shard-{000000..001281}.tar) "
                          "or a folder with manifest.json (make one with `dbot-shards synthetic --out DIR --num N`)")
    if any(c in d.shards for c in "{}") or d.shards.startswith(("pipe:", "http")) or d.shards.endswith(".tar"):
        return d.shards
    folder = Path(d.shards)
    if not (folder / "manifest.json").exists():
        if d.synthetic_num <= 0:
            raise ConfigError(f"data.shards={folder} has no manifest.json; point it at a shard pattern or set "
                              "data.synthetic_num to generate a synthetic dataset there")
        if rank == 0:
            write_synthetic_shards(folder, d.synthetic_num, img_size=max(64, cfg.model.img_size), seed=cfg.run.seed)
        barrier()
    return shard_pattern(folder)


def check_resume(cfg: Config, meta: dict, world_size: int, zstage: int, tag: str) -> None:
    """Fail before anything is built if the checkpoint cannot continue under this config."""
    saved = meta["client_state"]
    diff = config_diff(saved["config"], cfg.to_dict(), RESUME_KEYS)
    if diff:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise ConfigError(f"checkpoint {tag} was written with a different config ({lines}). Restore those values, "
                          "or start a new run folder (run.out_dir=...) / pass --resume none after moving it away")
    if saved["world_size"] != world_size or saved["zero_stage"] != zstage:
        raise ConfigError(f"checkpoint {tag} was written by {saved['world_size']} ranks under ZeRO-{saved['zero_stage']}, "
                          f"this run has {world_size} ranks under ZeRO-{zstage}: DeepSpeed's partitioned optimizer "
                          "state only loads on the same layout (convert it with DeepSpeed's universal checkpoint tools)")


class Trainer:
    """Owns the engine, the teacher, the data stream and the resumable state {step, samples_seen}."""

    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg = cfg
        grad_accum_steps(cfg, world_size_from_env())       # batch arithmetic error before anything is built
        self.rank, self.world, self.device = init_distributed()
        self.accum = grad_accum_steps(cfg, self.world)
        self.dtype = torch.bfloat16 if cfg.optim.precision == "bf16" else torch.float32
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.pattern = resolve_shards(cfg, self.rank)
        self.step, self.samples_seen, self.skipped = 0, 0, 0
        try:   # bad data settings fail here, before the engine is built: missing shards, too few shards
            self.plan: StagePlan = make_plan(cfg, self._steps_per_epoch())
            self._loader()
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from e
        self.zstage = zero_stage(build_ds_config(cfg, self.world))
        self.resume_dir, tag = self._resume_tag(resume)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        barrier()
        self._build(tag)
        self.metrics = MetricsLogger(self.run_dir, self.rank, self.plan.total_steps, self.step,
                                     cfg.run.progress, cfg.run.tensorboard)
        self.data_iter = None
        self._reset_window()

    # -- setup ---------------------------------------------------------------------------------------------
    def _resume_tag(self, resume: str) -> tuple[Path, str | None]:
        """(folder, tag) of the checkpoint to resume from; tag None for a fresh start."""
        if resume == "none":
            if ckpt.complete_tags(self.ckpt_dir):
                raise ConfigError(f"{self.ckpt_dir} already holds checkpoints; pass --resume auto to continue them "
                                  "or set run.out_dir to a new folder")
            return self.ckpt_dir, None
        ckpt_dir = self.ckpt_dir
        if resume != "auto":                                 # an explicit checkpoint folder
            path = Path(resume)
            ckpt_dir, tag = path.parent, path.name
            if not (path / "COMPLETE").exists():
                raise ConfigError(f"--resume {path}: not a complete checkpoint (no COMPLETE marker)")
        else:
            tag = ckpt.find_resume_tag(ckpt_dir)
            if tag is None:
                return ckpt_dir, None
        check_resume(self.cfg, ckpt.read_meta(ckpt_dir, tag), self.world, self.zstage, tag)
        return ckpt_dir, tag

    def _build(self, tag: str | None) -> None:
        cfg = self.cfg
        self.teacher = Teacher(cfg, self.device, self.dtype)
        external, self.teacher_dim = None, cfg.model.embed_dim
        if cfg.teacher.source != "bootstrap":          # weights from elsewhere: the predictor follows its width
            external, self.teacher_dim = external_teacher(cfg)
        student = build_student(cfg.model, teacher_dim=self.teacher_dim, seed=mix_seed(cfg.run.seed, 0))
        initial_encoder = {k: v.detach().clone() for k, v in student.encoder.named_parameters()}
        self.engine, self.ds_config = init_student_engine(student.to(self.device), cfg, self.world, self.device)
        self.engine.train()
        if external is not None:
            self.teacher.adopt(external)
        elif tag is None:            # stage 0's teacher is the student's own random initial encoder
            self.teacher.rebuild(self.plan.teacher_depths[0], initial_encoder)
        if tag is None:
            return
        client, teacher = ckpt.load(self.engine, self.resume_dir, tag)
        state = client["dbot"]
        self.step, self.samples_seen, self.skipped = state["step"], state["samples_seen"], state.get("skipped", 0)
        if external is None:
            self.teacher.rebuild(teacher["depth"], teacher["state"])
        if self.rank == 0:
            print(f"[dbot] resumed from {self.resume_dir / tag} at step {self.step} (stage {state['stage']})", flush=True)

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train until the plan ends (or run.stop_after_steps); returns the run folder."""
        cfg, plan = self.cfg, self.plan
        while self.step < plan.total_steps:
            self._train_step()
            self.step += 1
            self.samples_seen += cfg.optim.global_batch
            self.metrics.step()
            stage_end = plan.is_stage_end(self.step)
            due_save = stage_end or self.step % cfg.run.save_every == 0
            if due_save or self.step % cfg.run.log_every == 0:
                self._sync_and_log()
            if stage_end and self.step < plan.total_steps:
                self._swap(plan.locate(self.step)[0])
            if due_save:
                self._save(stage_end)
            if cfg.run.stop_after_steps and self.step >= cfg.run.stop_after_steps:
                self.metrics.event("stopped", step=self.step, reason="run.stop_after_steps")
                break
        self.metrics.close()
        self.data_iter = None
        barrier()
        return self.run_dir

    def _steps_per_epoch(self) -> float:
        """Resampled: N // global_batch, as the reference's drop-last loader. Exact epochs: the loader's epoch
        (every sample once, plus < readers x micro_batch repeats so every rank gets whole batches)."""
        d, o = self.cfg.data, self.cfg.optim
        if d.resampled:
            return (d.num_samples or dataset_size(self.pattern)) // o.global_batch
        total = sum(shard_counts(self.pattern, d.manifest or None))
        if d.num_samples and d.num_samples != total:
            raise ConfigError(f"data.num_samples={d.num_samples} but the manifest counts {total} samples; "
                              "leave data.num_samples at 0 with data.resampled=false")
        return epoch_batches_per_rank(total, self.world, d.num_workers, o.micro_batch) / self.accum

    def _loader(self):
        """The data stream from the current step. Resampled: reseeded by (seed, step). Exact epochs: one seed
        for the run, positioned after the micro-batches this rank already consumed."""
        d = self.cfg.data
        seed, start = ((mix_seed(self.cfg.run.seed, self.step), 0) if d.resampled
                       else (self.cfg.run.seed, self.step * self.accum))
        return build_train_loader(self.pattern, img_size=self.cfg.model.img_size, micro_batch=self.cfg.optim.micro_batch,
                                  num_workers=d.num_workers, seed=seed, rank=self.rank, world_size=self.world,
                                  resampled=d.resampled, shuffle_buffer=d.shuffle_buffer, start_batch=start,
                                  manifest=d.manifest or None)

    def _batches(self):
        """The current data iterator, built at the start, on resume, and (resampled) after each checkpoint."""
        if self.data_iter is None:
            self.data_iter = iter(self._loader())
        return self.data_iter

    def _train_step(self) -> None:
        """One optimizer step = `accum` micro-steps of teacher forward, student forward/backward."""
        set_lr(self.engine, self.plan.lr(self.step))
        for micro in range(self.accum):
            t0 = time.perf_counter()
            images, skipped = next(self._batches())
            self.skipped += skipped
            self.data_wait_s += time.perf_counter() - t0
            x = normalize(images.to(self.device, non_blocking=True), self.dtype)
            torch.manual_seed(mix_seed(self.cfg.run.seed, self.step, micro, self.rank))
            target = self.teacher(x)
            pred, mask = self.engine(x)
            loss = dbot_loss(pred, target, mask)
            self.engine.backward(loss)
            self.engine.step()
            loss = loss.detach()
            self.loss_sum += loss / self.accum
            bad = ~torch.isfinite(loss) & (self.bad_step == 0)      # remember the first bad step (1-based)
            self.bad_step = torch.where(bad, torch.full_like(self.bad_step, self.step + 1), self.bad_step)

    # -- sync points ---------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.bad_step = torch.zeros((), device=self.device, dtype=torch.long)
        self.window_start, self.window_step, self.data_wait_s = time.perf_counter(), self.step, 0.0

    def _sync_and_log(self) -> None:
        """Reduce the window's metrics over ranks (the host syncs of the run) and stop on a non-finite loss."""
        bad = int(all_reduce_max(self.bad_step.clone()).item())
        if bad > 0:
            stage, t = self.plan.locate(bad - 1)
            last = ckpt.find_resume_tag(self.ckpt_dir)
            raise NonFiniteLoss(
                f"non-finite loss at stage {stage}, step {t + 1} of the stage (global step {bad}). No checkpoint was "
                f"written from this state; `--resume auto` restarts from {last or 'the beginning'}. Consider a "
                "lower optim.blr, optim.clip_grad, or checking the data")
        steps = self.step - self.window_step
        skipped = torch.tensor(float(self.skipped), device=self.device, dtype=torch.float64)
        loss_sum, skipped_all = all_reduce_sum(torch.stack([self.loss_sum, skipped])).tolist()
        loss = loss_sum / (self.world * steps)
        dt = time.perf_counter() - self.window_start
        stage, t = self.plan.locate(self.step - 1)
        img_per_s = steps * self.cfg.optim.global_batch / dt
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.log({
            "stage": stage, "step": self.step, "step_in_stage": t + 1, "loss": loss, "lr": self.plan.lr(self.step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else None, "img_per_s": img_per_s,
            "img_per_s_per_gpu": img_per_s / self.world, "data_wait_frac": self.data_wait_s / dt,
            "samples_seen": self.samples_seen, "skipped_samples": int(skipped_all),
        })
        self._reset_window()

    def _swap(self, next_stage: int) -> None:
        """Stage end: teacher <- student encoder (exact low-precision copy), student re-initialised, optional
        AdamW reset. The LR restarts by itself: plan.lr() is per stage."""
        encoder = full_fp32_state(self.engine, "encoder.")                 # collective
        depth = self.plan.teacher_depths[next_stage]
        self.teacher.rebuild(depth, {k: v.to(self.dtype) for k, v in encoder.items()})
        fresh = build_student(self.cfg.model, teacher_dim=self.teacher_dim, seed=mix_seed(self.cfg.run.seed, next_stage))
        write_student_weights(self.engine, dict(fresh.named_parameters()), self.zstage, self.rank)
        if self.cfg.schedule.reset_optimizer:
            reset_adam(self.engine)
        self.metrics.event("stage_switch", step=self.step, from_stage=next_stage - 1, to_stage=next_stage,
                           teacher_depth=depth, optimizer_reset=self.cfg.schedule.reset_optimizer)

    def _save(self, stage_end: bool) -> None:
        tag = ckpt.save(self.engine, self.teacher, self.ckpt_dir, self.step, self.client_state(), stage_end,
                        self.cfg.run.keep_last)
        self.metrics.event("checkpoint", step=self.step, tag=tag, stage_end=stage_end)
        if self.cfg.data.resampled:
            self.data_iter = None    # the stream restarts from (seed, step): resume sees the same batches
        self._reset_window()

    def client_state(self) -> dict:
        stage, _ = self.plan.locate(self.step)
        return {"step": self.step, "stage": stage, "samples_seen": self.samples_seen, "skipped": self.skipped,
                "data_seed": mix_seed(self.cfg.run.seed, self.step), "world_size": self.world,
                "zero_stage": self.zstage, "plan_lengths": list(self.plan.lengths), "config": self.cfg.to_dict()}
