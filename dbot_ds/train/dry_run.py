"""`dbot-pretrain --dry-run`: every check a run makes before its first step, then exit 0 without training and
without DeepSpeed (no engine, no op build). The checks are the start's own (a Preflight, preflight.py); a failing
one raises what a start raises, so the exit code (2) and the one-line error are the same. Every rank checks, rank 0
prints:

- config: the resolved config as YAML, the text config.yaml would hold (optim.precision resolved);
- data: pattern, shards, samples and where the count came from; the first sample of the first and the last shard
  through the training decoder (data/augment.py); every rank's own share (its readers' slices of the first epoch,
  or with data.resampled=true a shard of its own) is non-empty and its first sample decodes;
- resume: `--resume auto` would continue TAG at step S, or start fresh; a checkpoint passes the start's checks
  (checkpoint/resume.py check_resume, checkpoint/store.py verify: sizes, SHA-256, weights-only scan);
- plan: the stages in steps and epochs, with the warmup;
- memory per GPU (dbot-plan's model, plan/memory.py, for this config and world size) and, with --card NAME or a
  GPU of a known kind, the time to train (dbot-plan --time's model, plan/timeplan.py).

Nothing is written into the run folder: whether it could be is read from its permissions instead of a test
write. The one exception is what a start writes there before anything else: the sample counts of a shard folder
without manifest.json (`shard_counts.json`, a cache a start reuses). Generated demo data (data.synthetic_num,
eval.synthetic_num) goes where a start would put it.
"""
from __future__ import annotations

import copy
import errno
import io
import os
import shutil
from pathlib import Path

import torch
import yaml
from PIL import Image

from dbot_ds.checkpoint import store as ckpt
from dbot_ds.checkpoint.reshard import DONE, universal_tag
from dbot_ds.checkpoint.resume import layout_changed
from dbot_ds.checkpoint.storage import explain, gib, raise_together
from dbot_ds.config import Config, ConfigError
from dbot_ds.data.augment import _Decoder, _load_rgb
from dbot_ds.data.epochs import slice_pieces, units
from dbot_ds.data.manifest import expand_shards, shard_counts
from dbot_ds.data.shard_reader import _raw_samples
from dbot_ds.distributed.engine import build_ds_config
from dbot_ds.distributed.groups import cleanup, gather_objects
from dbot_ds.model.flops import PEAK_TFLOPS
from dbot_ds.model.vit import Student, build_teacher
from dbot_ds.plan import memory, timeplan

from .preflight import Preflight

MFU = 0.4                   # dbot-plan --time's default model FLOPs utilisation for a --card


def dry_run(cfg: Config, resume: str = "auto", trust_checkpoint: bool = False, card: str | None = None) -> Path:
    """Run the checks of a start and print what they found; returns the run folder. Raises as a start would."""
    if os.environ.get("RANK", "0") == "0":
        print("[dbot] dry run: the checks of a start, then exit: nothing is trained, no DeepSpeed engine is built, "
              "nothing is written into the run folder", flush=True)
    run = DryRun(cfg, resume, trust_checkpoint)
    lines = run.report(resume, card)
    if run.rank == 0:
        print("\n".join(lines), flush=True)
    cleanup()
    return run.run_dir


class DryRun(Preflight):
    """A start up to DeepSpeed (preflight.py), then the checks that read rather than build, and the report."""

    def _probe_run_dir(self) -> None:
        """As a start checks the run folder, but without creating or writing anything in it."""
        raise_together(unwritable(self.run_dir) if self.rank == 0 else None)

    def report(self, resume: str, card: str | None) -> list[str]:
        """The report's lines (every rank computes them; collectives inside)."""
        data = self._data_lines()                    # collective: every rank its own share
        resumed = self._resume_lines(resume)         # collective when resuming: the checkpoint's files are verified
        config = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)    # as config.yaml (config/load.py dump_config)
        return (["[dbot] config (the config.yaml this run writes):", config.rstrip("\n")] + data + resumed
                + self._plan_lines() + self._run_dir_lines() + self._memory_lines() + self._time_lines(card)
                + [f"[dbot] dry run passed: the same command without --dry-run would train ({self.world} rank(s))"])

    # -- data ----------------------------------------------------------------------------------------------
    def _data_lines(self) -> list[str]:
        d = self.dataset
        lines = [f"[dbot] data: {d.num_shards} shards, {d.num_samples} samples (count from {d.source})"
                 + (f", {len(d.skipped)} corrupt shard(s) left out" if d.skipped else "") + f": {d.pattern}"]
        mine, error = [], None
        try:
            shards = expand_shards(self.pattern)
            if self.rank == 0:
                for what, url in (("first shard", shards[0]), ("last shard", shards[-1])):
                    mine.append(f"[dbot]   {what} {_name(url)}: "
                                f"{first_sample(url, 0, self._decoder(), self.cfg.data.stall_timeout_s)}")
            mine += self._own_share(shards)
        except (OSError, RuntimeError, ValueError) as e:      # ConfigError is a ValueError
            error = str(e)
        gathered = gather_objects((mine, error))
        failed = [(r, e) for r, (_, e) in enumerate(gathered) if e]
        if failed:
            rank, message = failed[0]
            raise ConfigError(message if self.world == 1 else f"rank {rank}: {message}")
        return lines + [line for rank_lines, _ in gathered for line in rank_lines]

    def _decoder(self) -> _Decoder:
        return _Decoder(self.cfg.model.img_size, self._augment())

    def _own_share(self, shards: list[str]) -> list[str]:
        """This rank's share of the data: non-empty, and its first sample decodes."""
        d, decode = self.cfg.data, self._decoder()
        if d.resampled:       # every reader draws from every shard: check one of this rank's own choosing
            i = self.rank * len(shards) // self.world
            return [f"[dbot]   rank {self.rank}: resampled, draws from all {len(shards)} shards; its own check, "
                    f"{_name(shards[i])}: {first_sample(shards[i], 0, decode, d.stall_timeout_s)}"]
        counts = shard_counts(self.pattern, self.dataset.manifest)
        unit = next(iter(units(self.stream.spec, counts, self.cfg.run.seed)))      # epoch 0's order of the shards
        g, out = self.stream.geometry, []
        for reader in self.stream.own_readers(self.rank):
            pieces = slice_pieces(unit.pieces, reader, g.readers)
            if not pieces:
                raise ConfigError(f"reader {reader} of {g.readers} ({self.world} ranks x {max(g.workers, 1)} "
                                  f"data workers) gets none of the {unit.samples} samples of epoch 0; use fewer "
                                  "data workers (data.num_workers) or more data")
            names = [_name(shards[s]) for s in dict.fromkeys(s for s, _, _ in pieces)]
            shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            shard, start, _ = pieces[0]
            out.append(f"[dbot]   rank {self.rank} reader {reader}: {sum(b - a for _, a, b in pieces)} samples of "
                       f"epoch 0 in {len(names)} shard(s) ({shown}); its first, {_name(shards[shard])} sample "
                       f"{start}: {first_sample(shards[shard], start, decode, d.stall_timeout_s)}")
        return out

    # -- resume --------------------------------------------------------------------------------------------
    def _resume_lines(self, resume: str) -> list[str]:
        if self.resume_tag is None:
            why = f"no complete checkpoint in {self.ckpt_dir}" if resume == "auto" else "--resume none"
            return [f"[dbot] resume: --resume {resume} would start fresh ({why})"]
        self._check_checkpoint()                     # what a start checks before any engine (a collective)
        meta = ckpt.read_meta(self.resume_dir, self.resume_tag)
        saved = meta["client_state"]
        self.step, stage = saved["step"], saved["stage"]
        where = f"stage {stage}" if stage < self.plan.num_stages else "all stages finished: nothing left to train"
        scan = "" if self.trust_checkpoint else ", weights-only scan"
        lines = [f"[dbot] resume: --resume {resume} would continue {self.resume_tag} at step {self.step} ({where}) "
                 f"from {self.resume_dir}; it fits this config, data and plan, and its files pass the checks (sizes, "
                 f"SHA-256{scan})"]
        if layout_changed(meta, self.world, self.zstage):
            copy_tag = universal_tag(self.resume_tag)
            cached = (self.resume_dir / copy_tag / DONE).exists()
            lines.append(f"[dbot] resume: written by {saved['world_size']} rank(s) under ZeRO-{saved['zero_stage']}, "
                         f"this run has {self.world} under ZeRO-{self.zstage}: a start "
                         f"{'reuses' if cached else 'first converts it into'} {copy_tag} (docs/checkpoints.md)")
        return lines

    # -- plan, run folder, memory, time --------------------------------------------------------------------
    def _plan_lines(self) -> list[str]:
        p, o, per_epoch = self.plan, self.cfg.optim, self._steps_per_epoch()

        def epochs(steps: int) -> str:
            return f"{steps / per_epoch:.4g} epochs" if per_epoch else "epochs unknown"
        teacher = self.cfg.teacher.source
        lines = [f"[dbot] plan: {p.num_stages} stage(s), {p.total_steps} optimizer steps of {o.global_batch} images "
                 f"({self.world} rank(s) x micro-batch {o.micro_batch} x {self.accum} accumulation); an epoch of "
                 f"{self.dataset.num_samples} samples is {per_epoch:.6g} steps"]
        for i, (start, n, depth) in enumerate(zip(p.starts, p.lengths, p.teacher_depths)):
            who = f"teacher depth {depth}" if teacher == "bootstrap" else f"teacher from {teacher}"
            lines.append(f"[dbot]   stage {i}: steps {start}-{start + n - 1} ({n} steps, {epochs(n)}), {who}; LR "
                         f"warmup {p.warmup_steps} steps ({epochs(p.warmup_steps)}) to {p.peak_lr:.4g}, then cosine "
                         f"to {p.min_lr:.4g}")
        if self.step:
            lines.append(f"[dbot]   from step {self.step}: {max(0, p.total_steps - self.step)} steps left")
        if self.cfg.run.stop_after_steps:
            lines.append(f"[dbot]   this invocation trains at most {self.cfg.run.stop_after_steps} steps "
                         "(run.stop_after_steps)")
        return lines

    def _meta_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The student and its largest teacher on the meta device: sizes without memory or time."""
        with torch.device("meta"):
            teacher = build_teacher(self.cfg.model, max(self.plan.teacher_depths), final_norm=False)
            return Student(self.cfg.model), teacher

    def _run_dir_lines(self) -> list[str]:
        here = existing_folder(self.run_dir)
        free = shutil.disk_usage(here).free
        need = ckpt.next_checkpoint_bytes(self.ckpt_dir, *self._meta_models())     # what the first save checks
        state = "exists" if self.run_dir.is_dir() else f"would be created in {here}"
        line = (f"[dbot] run folder: {self.run_dir} ({state}, writable), {gib(free)} free; a checkpoint takes about "
                f"{gib(need)}, {self.cfg.run.keep_last} periodic ones are kept (run.keep_last) plus each stage end's")
        if free < need:
            line += ". WARNING: not even one fits: the first save would stop the run"
        return [line]

    def _memory_lines(self) -> list[str]:
        m, o, z = self.cfg.model, self.cfg.optim, self.zstage
        zero_cfg = build_ds_config(self.cfg, self.world).get("zero_optimization", {})
        offload = zero_cfg.get("offload_optimizer", {}).get("device", "none") != "none"
        kw = dict(zero=z, world=self.world, ckpt_every=m.act_ckpt_every, teacher=self.cfg.teacher.placement,
                  offload=offload)
        mem = memory.plan(m, micro_batch=o.micro_batch, **kw)
        cmd = (f"dbot-plan --arch {m.arch} --img-size {m.img_size} --zero {z} --world {self.world} --micro-batch "
               f"{o.micro_batch} --ckpt {m.act_ckpt_every} --teacher {self.cfg.teacher.placement}"
               + (" --offload" if offload else ""))
        lines = [f"[dbot] memory per GPU ({cmd}): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in mem.gib().items()) + " GiB",
                 "[dbot]   " + ", ".join(
                     f"{g} {'fits' if mem.total <= cap * memory.GIB else 'does NOT fit'} (largest micro-batch "
                     f"{memory.max_micro_batch(m, cap, **kw)})" for g, cap in memory.GPUS.items())]
        if self.device.type == "cuda":
            have = torch.cuda.get_device_properties(self.device).total_memory
            lines.append(f"[dbot]   this GPU, {torch.cuda.get_device_name(self.device)}: {have / memory.GIB:.1f} GiB, "
                         f"{'fits' if mem.total <= have else 'does NOT fit'}")
        notes = [n for n, on in (("in bf16 (this run is fp32: weights, gradients and activations take about twice)",
                                  o.precision == "fp32"),
                                 (f"with the teacher sized as the student's architecture (this run's is from "
                                  f"{self.cfg.teacher.source})", self.cfg.teacher.source != "bootstrap")) if on]
        if notes:
            lines.append("[dbot]   the model counts " + "; ".join(notes))
        return lines

    def _time_lines(self, card: str | None) -> list[str]:
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        card = card or (detect_card(gpu) if gpu else None)
        if card is None:
            return [f"[dbot] time: give --card NAME ({', '.join(sorted(PEAK_TFLOPS))}) for the time to train "
                    "(dbot-plan --time's model)" + (f"; this GPU ({gpu}) is not one of them" if gpu else "")]
        if self.zstage not in (2, 3) or self.cfg.teacher.source != "bootstrap":
            return [f"[dbot] time: dbot-plan --time models the bootstrapped recipe under ZeRO-2 or ZeRO-3; this run "
                    f"has ZeRO-{self.zstage} and a teacher from {self.cfg.teacher.source}"]
        cfg = copy.deepcopy(self.cfg)                 # this run's plan, in steps, as the recipe
        s = cfg.schedule
        s.stage_epochs, s.warmup_epochs = [], 0.0
        s.stage_steps, s.warmup_steps = list(self.plan.lengths), self.plan.warmup_steps
        recipe = memory.time_recipe(cfg, self.zstage, cfg.teacher.placement, self.dataset.num_samples)
        fabric = timeplan.FABRICS.get(card, timeplan.FABRICS["A100"])
        rate = timeplan.flops_per_s_from_card(PEAK_TFLOPS[card], MFU)
        row = timeplan.scaling_table(recipe, [self.world], fabric, rate)[0]
        steps = ", ".join(f"stage {st['stage']} {st['step_s']:.3g} s" for st in row["stages"])
        line = (f"[dbot] time ({card} at MFU {MFU}, {self.world} GPU(s), dbot-plan --time's model): a step takes "
                f"{steps}; the plan takes {row['days']:.2f} days ({row['compute_days']:.2f} of compute)")
        if self.step:
            left = sum(max(0, min(n, start + n - self.step)) * st["step_s"]
                       for start, n, st in zip(self.plan.starts, self.plan.lengths, row["stages"]))
            line += f", {left / timeplan.SECONDS_PER_DAY:.2f} days from step {self.step}"
        return [line + "; a lower bound: data loading, checkpoints and swaps are not modelled"]


# ---------------------------------------------------------------------------------------------- helpers

def existing_folder(folder: Path) -> Path:
    """`folder`, or the nearest folder above it that exists (where it would be created)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def unwritable(folder: Path) -> str | None:
    """The line checkpoint/storage.py probe_writable would give for `folder` (None: writable), found from
    permissions and the filesystem's flags instead of creating the folder and writing a file into it."""
    here = existing_folder(folder)
    if not here.is_dir():
        exists = here == folder.absolute()
        code, cls = (errno.EEXIST, FileExistsError) if exists else (errno.ENOTDIR, NotADirectoryError)
        return explain(cls(code, os.strerror(code), str(folder)), folder)
    if os.statvfs(here).f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif not os.access(here, os.W_OK | os.X_OK):
        code = errno.EACCES
    else:
        return None
    return explain(OSError(code, os.strerror(code)), folder)


def first_sample(url: str, index: int, decode: _Decoder, stall_s: float = 30.0) -> str:
    """'KEY: FORMAT WxH -> 3xSxS' for sample `index` of shard `url`, through the training decoder; a ConfigError
    naming the shard if it cannot be read there or does not decode."""
    samples = _raw_samples(url, index, index + 1, count=False, stall_s=stall_s)
    try:
        sample = next(samples, None)
    finally:
        samples.close()                                # a remote shard's reader process ends here
    where = f"sample {index} of shard {url}"
    if sample is None:
        raise ConfigError(f"{where} cannot be read (the shard is unreadable, or shorter than its count); check the "
                          "path, credentials of pipe:/http sources, and the file")
    data = decode.image_bytes(sample, count=False)
    if data is None:
        raise ConfigError(f"{where} ({sample.get('__key__')!r}) holds no image: its keys are "
                          f"{sorted(k for k in sample if not k.startswith('__'))}; images go under jpg, jpeg, png or "
                          "webp")
    try:
        header = Image.open(io.BytesIO(data))
        _load_rgb(data, decode.draft_side)             # the full decode: corrupt or truncated data raises here
    except Exception as e:  # noqa: BLE001 - PIL raises a zoo of types for bad data, as augment.py notes
        raise ConfigError(f"{where} ({sample.get('__key__')!r}) does not decode: {e!r}"[:400]) from None
    out = decode(sample, seed=0, count=False)
    size, shape = "x".join(map(str, header.size)), "x".join(map(str, out.shape))
    return f"{sample.get('__key__')!r}: {header.format} {size} -> {shape}"


def detect_card(device_name: str) -> str | None:
    """The PEAK_TFLOPS entry a CUDA device name is (e.g. 'NVIDIA H200' -> 'H200'), or None."""
    flat = device_name.upper().replace(" ", "").replace("-", "")
    return next((c for c in sorted(PEAK_TFLOPS, key=len, reverse=True) if c in flat), None)


def _name(url: str) -> str:
    return os.path.basename(url.rstrip("/")) or url


