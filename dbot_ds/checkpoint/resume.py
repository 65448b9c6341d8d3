"""Can a checkpoint continue under this run's config? Checked from its COMPLETE record before any engine is built:
the keys that change the model, batch or step -> stage map, the data layout of an exact-epoch stream, and the
stage plan (a dataset of another size would move the stage boundaries under the saved step)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dbot_ds.config import Config, ConfigError, config_diff
from dbot_ds.data.dataset import Dataset
from dbot_ds.data.epochs import Geometry
from dbot_ds.plan.stages import StagePlan

from .store import complete_tags, find_resume_tag

# Config keys a resumed run must share with its checkpoint (they change the model, batch or step -> stage map).
RESUME_KEYS = ["model.img_size", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
               "model.mlp_ratio", "model.decoder_embed_dim", "model.decoder_depth", "model.decoder_num_heads",
               "model.mask_ratio", "model.student", "model.mask", "model.num_mask_patches",
               "model.min_mask_patches_per_block", "model.layer_scale_init", "objective",
               "teacher.init_depth", "teacher.final_norm", "teacher.source", "teacher.layer", "teacher.clip_target",
               "teacher.input_size", "teacher.precision", "optim.grad_reduce_dtype",
               "optim.global_batch",
               "optim.precision", "schedule", "data.num_samples", "run.seed"]


def check_resume(cfg: Config, meta: dict, world_size: int, zstage: int, tag: str, plan: StagePlan,
                 dataset: Dataset) -> StagePlan:
    """Fail before anything is built if the checkpoint cannot continue under this config; returns the stage plan
    to continue with (this run's, or the checkpoint's own with run.keep_saved_plan=true)."""
    saved = meta["client_state"]
    diff = config_diff(saved["config"], cfg.to_dict(), RESUME_KEYS)
    if diff:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        hint = (" (optim.precision=auto continues in the checkpoint's precision)" if "optim.precision" in diff else "")
        raise ConfigError(f"checkpoint {tag} was written with a different config ({lines}). Restore those values"
                          f"{hint}, or start a new run folder (run.out_dir=...) / pass --resume none after moving it away")
    if not cfg.data.resampled and not saved.get("data_stream") and geometry(cfg, world_size) != _saved_geometry(saved):
        raise ConfigError(
            f"checkpoint {tag} predates per-reader data positions, so its exact-epoch stream (data.resampled=false) "
            f"can only continue on the layout that wrote it: {saved['world_size']} ranks, data.num_workers="
            f"{saved['config']['data']['num_workers']}, optim.micro_batch={saved['config']['optim']['micro_batch']}, "
            f"data.shuffle_buffer={saved['config']['data']['shuffle_buffer']}")
    return _resume_plan(cfg, saved, tag, plan, dataset, world_size)


def geometry(cfg: Config, world_size: int) -> Geometry:
    d = cfg.data
    return Geometry(world_size, d.num_workers, cfg.optim.micro_batch, d.shuffle_buffer, d.open_shards)


def _saved_geometry(saved: dict) -> Geometry:
    """The data layout a checkpoint was written with (older checkpoints: from its config)."""
    if saved.get("data_stream"):
        return Geometry.from_list(saved["data_stream"]["geometry"])
    d, o = saved["config"]["data"], saved["config"]["optim"]
    return Geometry(saved["world_size"], d["num_workers"], o["micro_batch"], d["shuffle_buffer"], open_shards=1)


def layout_changed(meta: dict, world_size: int, zstage: int) -> bool:
    """True when the checkpoint's ZeRO shards were cut for another world size or ZeRO stage (see reshard.py)."""
    saved = meta["client_state"]
    return (saved["world_size"], saved["zero_stage"]) != (world_size, zstage)


def _resume_plan(cfg: Config, saved: dict, tag: str, plan: StagePlan, dataset: Dataset, world_size: int) -> StagePlan:
    """The step -> stage map must not move under a resumed run: a different dataset size (or loader geometry in
    exact-epoch mode) changes the stage lengths in steps, so the saved step could land in the wrong stage."""
    old_n, old_lengths = saved.get("dataset", {}).get("num_samples"), saved.get("plan_lengths")
    old_warmup = saved.get("plan_warmup_steps", plan.warmup_steps)
    size_differs = old_n is not None and old_n != dataset.num_samples
    plan_differs = old_lengths is not None and (tuple(old_lengths), old_warmup) != (plan.lengths, plan.warmup_steps)
    if not (size_differs or plan_differs):
        return plan
    # Schedule epochs are N // global_batch steps in both data modes; checkpoints planned before that (exact
    # epochs counted as the padded pass) differ on a new reader layout only: such a run keeps its own clock.
    layout_only = not size_differs and not cfg.data.resampled and _saved_geometry(saved) != geometry(cfg, world_size)
    if cfg.run.keep_saved_plan or layout_only:
        return dataclasses.replace(plan, lengths=tuple(old_lengths), warmup_steps=old_warmup)
    raise ConfigError(
        f"checkpoint {tag} was written for a dataset of {old_n} samples and a stage plan of {old_lengths} steps "
        f"(warmup {old_warmup}); this run has {dataset.num_samples} samples ({dataset.pattern}) and a plan of "
        f"{list(plan.lengths)} steps (warmup {plan.warmup_steps}). Point data.shards at the original data, or pass "
        "run.keep_saved_plan=true to continue with the checkpoint's step plan unchanged")


def requested_tag(resume: str, ckpt_dir: Path) -> tuple[Path, str | None]:
    """(folder, tag) that `--resume` names: `none` a fresh start (refused if the run folder holds checkpoints),
    `auto` the newest complete checkpoint in `ckpt_dir` (tag None if there is none), else a checkpoint folder."""
    if resume == "none":
        if complete_tags(ckpt_dir):
            raise ConfigError(f"{ckpt_dir} already holds checkpoints; pass --resume auto to continue them "
                              "or set run.out_dir to a new folder")
        return ckpt_dir, None
    if resume == "auto":
        return ckpt_dir, find_resume_tag(ckpt_dir)
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise ConfigError(f"--resume {path}: not a complete checkpoint (no COMPLETE marker)")
    return path.parent, path.name
