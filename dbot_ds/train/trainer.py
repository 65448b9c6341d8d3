"""The dBOT training loop on DeepSpeed: all stages, teacher swaps and checkpoints in one run.

Determinism (what makes resume exact): the masking / drop-path RNG is reseeded from (seed, step, micro-step,
rank) before every forward. The data stream is either resampled and rebuilt from (seed, step) at the start of
the run and after every checkpoint, or (data.resampled=false) one seeded stream of exact epochs that a resumed
run re-enters at the micro-batch where it stopped. Either way a resumed run sees the same batches and masks as
one that never stopped. On another layout (world size, workers, micro-batch) an exact-epoch stream continues
with exactly the samples its epoch still owed (epochs.py).
No host sync per step: losses and the first non-finite step are accumulated on the device and reduced only at
log steps, stage ends and checkpoints.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from dbot_ds.checkpoint import store as ckpt
from dbot_ds.checkpoint.export import write_stage_encoder
from dbot_ds.checkpoint.reshard import ensure_universal, load_universal
from dbot_ds.checkpoint.resume import layout_changed
from dbot_ds.checkpoint.safety import load_teacher_file
from dbot_ds.checkpoint.storage import StorageError, explain, probe_writable, raise_together
from dbot_ds.config import Config, dump_config
from dbot_ds.data.epochs import StreamState
from dbot_ds.data.augment import Views, normalize
from dbot_ds.data.manifest import shard_counts
from dbot_ds.data.stream import mix_seed
from dbot_ds.distributed.engine import (full_fp32_state, init_student_engine, reset_adam, set_lr,
                                 write_student_weights)
from dbot_ds.distributed.groups import all_reduce_max, all_reduce_sum, barrier, init_deepspeed
from dbot_ds.model.objective import loss_fn
from dbot_ds.model.vit import build_student
from dbot_ds.teachers.placement import Teacher

from .guards import NonFiniteLoss, SkippedSteps, TooManySkippedSteps, where
from .metrics import MetricsLogger
from .preflight import Preflight


class Trainer(Preflight):
    """Owns the engine, the teacher, the data stream and the resumable state {step, samples_seen}."""

    def __init__(self, cfg: Config, resume: str = "auto", trust_checkpoint: bool = False):
        super().__init__(cfg, resume, trust_checkpoint)   # every check before DeepSpeed, in order (preflight.py)
        init_deepspeed(cfg.run.collective_timeout_s)  # only now: on a CPU it may build an op for minutes
        self.universal_tag: str | None = None           # set when the checkpoint's layout differs from ours
        self.resume_dir, tag = self._check_resume()
        raise_together(self._dump_config() if self.rank == 0 else None)
        self._build(tag)
        self.skips = SkippedSteps(cfg.optim.max_skipped_in_row, cfg.optim.max_skipped_frac, self.engine.skipped_steps)
        self.metrics = MetricsLogger(self.run_dir, self.rank, self.plan.total_steps, self.step,
                                     cfg.run.progress, cfg.run.tensorboard, resumed=self.resumed,
                                     wandb_config=cfg.to_dict() if cfg.run.wandb else None)   # resolved config
        self.data_iter = None
        self._reset_window()

    # -- setup (the checks before it: preflight.py) ---------------------------------------------------------
    def _check_resume(self) -> tuple[Path, str | None]:
        """(folder, tag) to resume from (tag None: a fresh start), once the tag is known to fit this run."""
        ckpt_dir, tag = self.resume_dir, self.resume_tag
        if tag is None:
            return ckpt_dir, None
        self._check_checkpoint()      # config, data, plan; hashes + pickle scan, before any engine exists
        if layout_changed(ckpt.read_meta(ckpt_dir, tag), self.world, self.zstage):
            self.universal_tag = ensure_universal(ckpt_dir, tag, self.rank)   # only after the checks above
        return ckpt_dir, tag

    def _build(self, tag: str | None) -> None:
        cfg = self.cfg
        self.teacher = Teacher(cfg, self.device, self.dtype)
        self.resumed: dict | None = None
        external, self.external = self.external, None   # adopted by the teacher below; not kept twice
        student = build_student(cfg.model, teacher_dim=self.teacher_dim, seed=mix_seed(cfg.run.seed, 0))
        initial_encoder = {k: v.detach().clone() for k, v in student.encoder.named_parameters()}
        self.engine, self.ds_config = init_student_engine(student.to(self.device), cfg, self.world, self.device,
                                                          load_universal=self.universal_tag is not None)
        self.engine.train()
        if external is not None:
            self.teacher.adopt(external)
        elif tag is None:            # stage 0's teacher is the student's own random initial encoder
            self.teacher.rebuild(self.plan.teacher_depths[0], initial_encoder)
        if tag is None:
            return
        if self.universal_tag is None:
            client, teacher = ckpt.load(self.engine, self.resume_dir, tag, self.trust_checkpoint)
            state = client["dbot"]
        else:             # another world size / ZeRO stage: DeepSpeed's state from the universal copy, ours as usual
            load_universal(self.engine, self.resume_dir, self.universal_tag)
            state = ckpt.read_meta(self.resume_dir, tag)["client_state"]
            teacher = load_teacher_file(self.resume_dir / tag / "teacher.pt", self.trust_checkpoint)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        if not cfg.data.resampled:
            self._resume_stream(state)
        # Older checkpoints hold rank 0's own count under "skipped"; newer ones the total over ranks.
        self.skipped_base = self.skipped_total = state.get("skipped_total", state.get("skipped", 0))
        if external is None:
            self.teacher.rebuild(teacher["depth"], teacher["state"])
        where = f"stage {state['stage']}" if state["stage"] < self.plan.num_stages else "all stages finished"
        if self.rank == 0:
            print(f"[dbot] resumed from {self.resume_dir / tag} at step {self.step} ({where})", flush=True)
        self.resumed = {"tag": str(self.resume_dir / tag), "step": self.step}

    def _resume_stream(self, state: dict) -> None:
        """The exact-epoch stream position of the checkpoint, carried over if this run's reader layout differs."""
        if state.get("data_stream"):
            saved = StreamState.from_dict(state["data_stream"])
        else:    # written before positions were recorded: same layout only (check_resume made sure)
            saved = StreamState(self.stream.spec, self.stream.geometry, self.step * self.accum, None)
        counts = shard_counts(self.pattern, self.dataset.manifest)
        self.stream = saved.continued_on(self.stream.geometry, counts, self.cfg.run.seed)
        if self.stream is not saved and self.rank == 0:
            print(f"[dbot] exact-epoch stream moved from {saved.geometry.readers} readers "
                  f"(micro-batch {saved.geometry.micro_batch}) to {self.stream.geometry.readers} "
                  f"(micro-batch {self.stream.geometry.micro_batch}): the samples its epoch still owed are read "
                  "once, then whole epochs follow", flush=True)

    def _dump_config(self) -> str | None:
        try:
            dump_config(self.cfg, self.run_dir / "config.yaml")
        except OSError as e:
            return explain(e, self.run_dir)
        return None

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train until the plan ends (or run.stop_after_steps); returns the run folder."""
        cfg, plan = self.cfg, self.plan
        stop_at = self.step + cfg.run.stop_after_steps if cfg.run.stop_after_steps else None   # this invocation's
        if self.monitor and self.step == 0:
            self._evaluate("student")                                     # the random initial encoder
        while self.step < plan.total_steps:
            self._train_step()
            self.step += 1
            self.heartbeat.step = self.step
            self.samples_seen += cfg.optim.global_batch
            self.metrics.step()
            stage_end = plan.is_stage_end(self.step)
            stopping = stop_at is not None and self.step >= stop_at
            due_save = stage_end or self.step % cfg.run.save_every == 0 or stopping   # a time-boxed stop saves first
            if due_save or self.step % cfg.run.log_every == 0:
                self._sync_and_log()
            if stage_end:
                self._stage_end(plan.locate(self.step - 1)[0])
            elif self.monitor and cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                self._evaluate("student")
            if due_save:
                self._save(stage_end)
            if stopping:
                self.metrics.event("stopped", step=self.step, reason="run.stop_after_steps",
                                   checkpoint=str(self.ckpt_dir / ckpt.tag_for(self.step)))
                break
        self.metrics.close()
        self.data_iter = None
        barrier()
        return self.run_dir

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
            images, info = next(self._batches())
            self.skipped += info.skipped
            self.stream.consumed(info.reader, info.unit, info.drawn)
            self.data_wait_s += time.perf_counter() - t0
            student_u8, teacher_u8 = images if isinstance(images, Views) else (images, None)
            x = normalize(student_u8.to(self.device, non_blocking=True), self.dtype)
            # A teacher of another input size gets its own view of the same crop (Views); else the student's.
            t = x if teacher_u8 is None else normalize(teacher_u8.to(self.device, non_blocking=True), self.dtype)
            torch.manual_seed(mix_seed(self.cfg.run.seed, self.step, micro, self.rank))
            target = self.teacher(t)
            pred, mask = self.engine(x)
            loss = loss_fn(self.cfg)(pred, target, mask)      # objective.loss
            self.engine.backward(loss)
            self.engine.step()
            loss = loss.detach()
            self.loss_sum += loss / self.accum
            bad = ~torch.isfinite(loss) & (self.bad_step == 0)      # remember the first bad step (1-based)
            self.bad_step = torch.where(bad, torch.full_like(self.bad_step, self.step + 1), self.bad_step)
        self.skips.update(self.step + 1, self.engine.skipped_steps)   # a host int DeepSpeed already agreed on

    # -- sync points ---------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.bad_step = torch.zeros((), device=self.device, dtype=torch.long)
        self.window_start, self.window_step, self.data_wait_s = time.perf_counter(), self.step, 0.0

    def _sync_and_log(self) -> None:
        """Reduce the window's metrics over ranks (the host syncs of the run) and stop on a non-finite loss."""
        steps = self.step - self.window_step
        bad = int(all_reduce_max(self.bad_step.clone()).item())
        if bad > 0:
            raise NonFiniteLoss(f"non-finite loss at {where(self.plan, bad)}. {self._restart_hint()}")
        skipped = self.skips.verdict(steps, self.plan)
        if skipped:
            raise TooManySkippedSteps(f"{skipped}. {self._restart_hint()} (limits: optim.max_skipped_in_row, "
                                      "optim.max_skipped_frac)")
        skipped = torch.tensor(float(self.skipped), device=self.device, dtype=torch.float64)
        loss_sum, skipped_all = all_reduce_sum(torch.stack([self.loss_sum, skipped])).tolist()
        self.skipped_total = self.skipped_base + int(skipped_all)
        loss = loss_sum / (self.world * steps)
        dt = time.perf_counter() - self.window_start
        stage, t = self.plan.locate(self.step - 1)
        img_per_s = steps * self.cfg.optim.global_batch / dt
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.log({
            "stage": stage, "step": self.step, "step_in_stage": t + 1, "loss": loss, "lr": self.plan.lr(self.step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else None, "img_per_s": img_per_s,
            "img_per_s_per_gpu": img_per_s / self.world, "data_wait_frac": self.data_wait_s / dt,
            "samples_seen": self.samples_seen, "skipped_samples": self.skipped_total,
            "skipped_steps": self.skips.total,
        })
        self.skips.reset_window()
        self._reset_window()

    def _restart_hint(self) -> str:
        last = ckpt.find_resume_tag(self.ckpt_dir)
        return (f"No checkpoint was written from this state; `--resume auto` restarts from {last or 'the beginning'}. "
                "Consider a lower optim.blr, optim.clip_grad, or checking the data")

    def _stage_end(self, stage: int) -> None:
        """The stage's trained encoder (fp32 master weights, final norm included) is kept as
        run_dir/stage_encoders/stage{K} and evaluated by the monitor; then, unless it was the last stage, the swap
        and the new teacher's evaluation."""
        encoder = full_fp32_state(self.engine, "encoder.")                 # collective
        raise_together(self._keep_stage_encoder(stage, encoder) if self.rank == 0 else None)
        if self.monitor:
            self._evaluate("student", encoder)
        if self.step < self.plan.total_steps:
            self._swap(stage + 1, encoder)
            if self.monitor and self.cfg.teacher.source == "bootstrap":
                self._evaluate("teacher")

    def _keep_stage_encoder(self, stage: int, encoder: dict[str, torch.Tensor]) -> str | None:
        """Rank 0: write the stage's encoder as a dbot-export folder; an error message (for all ranks) or None."""
        if self.cfg.model.student != "asymmetric":
            return None          # the symmetric (CLIP-recipe) student has one stage: its checkpoint holds it
        try:
            write_stage_encoder(encoder, self.cfg, self.run_dir / "stage_encoders" / f"stage{stage}", stage, self.step)
        except OSError as e:
            return f"writing the stage-{stage} encoder failed: {explain(e, self.run_dir)}"
        return None

    def _evaluate(self, which: str, encoder_state: dict[str, torch.Tensor] | None = None) -> None:
        """Log the monitor's kNN of the student (the engine's weights, or `encoder_state` at a stage end) or of
        the teacher as an `eval` record. A collective. A stage end's fp32 encoder is scored in fp32 whatever
        optim.precision (KnnMonitor.evaluate_encoder: the numbers of `dbot-eval knn` on stage_encoders/stageK)."""
        stage = self.plan.locate(max(self.step - 1, 0))[0]
        if which == "teacher":
            record = self.monitor.evaluate(self.teacher.module, self.teacher)
            stage += 1
        elif encoder_state is not None:
            record = self.monitor.evaluate_encoder(encoder_state)
        else:
            record = self.monitor.evaluate(self.engine.module.encoder)
        self.metrics.eval_record({"stage": stage, "step": self.step, "model": which, **record})
        self.window_start += record["seconds"]          # the log window's img/s counts training time only

    def _swap(self, next_stage: int, encoder: dict[str, torch.Tensor]) -> None:
        """Stage end: teacher <- student encoder (exact low-precision copy), student re-initialised, optional
        AdamW reset. The LR restarts by itself: plan.lr() is per stage."""
        depth = self.plan.teacher_depths[next_stage]
        self.teacher.rebuild(depth, encoder)                               # cast to teacher.precision inside
        fresh = build_student(self.cfg.model, teacher_dim=self.teacher_dim, seed=mix_seed(self.cfg.run.seed, next_stage))
        write_student_weights(self.engine, dict(fresh.named_parameters()), self.zstage, self.rank)
        if self.cfg.schedule.reset_optimizer:
            reset_adam(self.engine)
        self.metrics.event("stage_switch", step=self.step, from_stage=next_stage - 1, to_stage=next_stage,
                           teacher_depth=depth, optimizer_reset=self.cfg.schedule.reset_optimizer)

    def _save(self, stage_end: bool) -> None:
        """Write a checkpoint. A folder that is read-only or too full for it fails on every rank before anything is
        written; a write that fails anyway removes its partial tag, so `latest` stays on the previous one."""
        need = ckpt.next_checkpoint_bytes(self.ckpt_dir, self.engine.module, self.teacher.module)
        raise_together(probe_writable(self.ckpt_dir, need))
        if not self.cfg.data.resampled:
            self._merge_stream_positions()
        try:
            tag = ckpt.save(self.engine, self.teacher, self.ckpt_dir, self.step, self.client_state(), stage_end,
                            self.cfg.run.keep_last)
        except OSError as e:
            partial = self.ckpt_dir / ckpt.tag_for(self.step)
            if self.rank == 0 and not (partial / "COMPLETE").exists():
                shutil.rmtree(partial, ignore_errors=True)
            raise StorageError(f"checkpoint at step {self.step} failed: {explain(e, self.ckpt_dir, need)}. "
                               f"`--resume auto` continues from {ckpt.find_resume_tag(self.ckpt_dir) or 'the start'}") from e
        self.metrics.event("checkpoint", step=self.step, tag=tag, stage_end=stage_end)
        if self.cfg.data.resampled:
            self.data_iter = None    # the stream restarts from (seed, step): resume sees the same batches
        self._reset_window()

    def _merge_stream_positions(self) -> None:
        """Every rank's view of its own readers' positions, combined (a collective), for the checkpoint."""
        positions = torch.zeros(self.stream.geometry.readers, 2, dtype=torch.long, device=self.device)
        own = self.stream.own_readers(self.rank)
        positions[own.start:own.stop] = torch.tensor(self.stream.positions[own.start:own.stop], dtype=torch.long)
        self.stream.positions = all_reduce_sum(positions).tolist()

    def client_state(self) -> dict:
        stage, _ = self.plan.locate(self.step)
        # skipped_total was reduced over ranks at the sync that always precedes a save.
        return {"step": self.step, "stage": stage, "samples_seen": self.samples_seen,
                "skipped_total": self.skipped_total, "data_seed": mix_seed(self.cfg.run.seed, self.step),
                "world_size": self.world, "zero_stage": self.zstage, "plan_lengths": list(self.plan.lengths),
                "plan_warmup_steps": self.plan.warmup_steps,
                "dataset": {"pattern": self.dataset.pattern, "num_shards": self.dataset.num_shards,
                            "num_samples": self.dataset.num_samples},
                "data_stream": None if self.cfg.data.resampled else self.stream.to_dict(),
                "config": self.cfg.to_dict()}
