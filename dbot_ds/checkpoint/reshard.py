"""Resume a checkpoint on another layout (world size, ZeRO stage 2 <-> 3) through DeepSpeed's universal checkpoint.

DeepSpeed's ZeRO shards (fp32 master, Adam moments) are cut for the world size and stage that wrote them.
`deepspeed.checkpoint.ds_to_universal` turns them into one file per parameter and state (`zero/<name>/fp32.pt`,
`exp_avg.pt`, `exp_avg_sq.pt`, `step.pt`), which an engine built with `checkpoint.load_universal=true` reads
into any layout. The conversion runs once, on rank 0, after the tag passed the safety checks (sizes, SHA-256,
weights-only scan: checkpoint.verify), into `<tag>.universal/` beside the tag. It is written to a partial
folder and renamed when done, so a killed conversion is redone, never half-used. Our own state (step, stage,
samples seen, teacher) does not depend on the layout: it comes from COMPLETE and teacher.pt as usual.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from pathlib import Path

import torch

from dbot_ds.distributed.groups import broadcast_object

from .safety import CheckpointRefused, refusal, scan_file

SUFFIX = ".universal"
DONE = "CONVERTED"


def universal_tag(tag: str) -> str:
    return tag + SUFFIX


def ensure_universal(ckpt_dir: Path, tag: str, rank: int) -> str:
    """Collective: the universal copy of `tag` (converted now by rank 0 unless cached), every file of it read
    with the weights-only scan first (a cached folder is as untrusted as the tag); returns its tag."""
    out = ckpt_dir / universal_tag(tag)
    problem = None
    if rank == 0:
        if not (out / DONE).exists():
            convert(ckpt_dir / tag, out)
        problem = _scan(out)
    problem = broadcast_object(problem)
    if problem:
        raise CheckpointRefused(problem)
    return universal_tag(tag)


def _scan(folder: Path) -> str | None:
    """The refusal message if any pickle of the universal folder holds a global outside the allow-list."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.pt"))
    problems = [p for n in names if (p := scan_file(folder / n))]
    return refusal(folder, problems) if problems else None


def convert(tag_dir: Path, out: Path) -> None:
    """ds_to_universal from `tag_dir` into `out` (partial folder first; DeepSpeed's chatter goes to a log)."""
    from deepspeed.checkpoint import ds_to_universal

    for stale in out.parent.glob(f"{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    print(f"[dbot] converting {tag_dir} to DeepSpeed's universal format for the new layout (once; cached in {out})",
          flush=True)
    t0 = time.monotonic()
    workers = max(1, min(4, (os.cpu_count() or 2) // 2))
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)      # checkpoints of dbot-ds <= 0.1 lack the version key
    with open(tmp / "convert.log", "w") as log, contextlib.redirect_stdout(log):
        ds_to_universal.main(args)
    _both_model_state_names(tmp)
    _complete_optimizer_state(tmp)
    (tmp / DONE).write_text(f"{tag_dir.name}\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"[dbot] converted in {time.monotonic() - t0:.0f} s", flush=True)


def _both_model_state_names(folder: Path) -> None:
    """A universal load looks for the model-states file by the *target* stage's name: ZeRO-3 engines read
    `zero_pp_rank_0_mp_rank_00_model_states.pt`, ZeRO-1/2 engines `mp_rank_00_model_states.pt`; the converter
    keeps the source's. Its weights are not used (they come from zero/), only the module layout and counters,
    so one file serves both names."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if (folder / n).exists()]
    for n in names:
        if have and not (folder / n).exists():
            os.link(folder / have[0], folder / n)


def _complete_optimizer_state(folder: Path) -> None:
    """DeepSpeed 0.19.8 writes the universal global state in the source stage's layout, but each target stage's
    loader reads its own: ZeRO-3 reads `optimizer_state_dict` ({'state': {0: {'step'}}, 'param_groups'}) from
    zero/optimizer_state.pt; ZeRO-1/2 read a top-level `param_groups` and `ds_version` there and the
    Adam step count from each parameter's step.pt (which a ZeRO-3 source does not write). Give the folder all of
    them, so either stage loads it. The step count is the same for every parameter."""
    import deepspeed
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = folder / "zero" / "optimizer_state.pt"
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
        sd = torch.load(path, map_location="cpu", weights_only=True)
    groups = sd.get("param_groups") or sd.get("optimizer_state_dict", {}).get("param_groups")
    step_files = sorted((folder / "zero").glob("*/step.pt"))
    if step_files:                                            # a ZeRO-1/2 source
        step = torch.load(step_files[0], map_location="cpu", weights_only=True)
    else:                                                     # a ZeRO-3 source
        step = sd["optimizer_state_dict"]["state"][0]["step"]
        _shape_zero3_states(folder, step)
    sd.setdefault("param_groups", groups)
    sd.setdefault("ds_version", deepspeed.__version__)
    sd.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": groups})
    torch.save(sd, path)


def _shape_zero3_states(folder: Path, step) -> None:
    """A ZeRO-3 source leaves each parameter's fp32 / exp_avg / exp_avg_sq as a flat tensor and no step.pt; the
    ZeRO-1/2 loader wants {'param': tensor of the parameter's shape, 'cat_dim': 0} and a step.pt. The shapes come
    from the source's own model-states file (`param_shapes`, plain torch.Size values)."""
    states = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    for name, shape in shapes.items():
        param_dir = folder / "zero" / name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            state = torch.load(param_dir / f"{key}.pt", map_location="cpu", weights_only=True)
            if torch.is_tensor(state):
                torch.save({"param": state.view(shape), "cat_dim": 0}, param_dir / f"{key}.pt")
        torch.save(step, param_dir / "step.pt")


def load_universal(engine, ckpt_dir: Path, utag: str) -> None:
    """Load master weights, Adam moments and step counts from a universal tag into an engine built with
    `checkpoint.load_universal=true` (any world size, ZeRO-1/2/3)."""
    # DeepSpeed 0.19.8's ZeRO-3 universal loader copies param group 0's hyper-parameters onto every group, which
    # would give the no-decay group (biases, norms) weight decay: keep ours.
    ours = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    clip = getattr(engine.optimizer, "clip_grad", None)      # ZeRO-1/2 would take the checkpoint's; keep the config's
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=utag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the universal checkpoint {ckpt_dir / utag}")
    for group, saved in zip(engine.optimizer.param_groups, ours):
        group.update(saved)
    if clip is not None:
        engine.optimizer.clip_grad = clip
    # DeepSpeed 0.19.8's ZeRO-3 universal loader gives every sub-group's Adam state the *same* step tensor, which
    # torch's AdamW then increments in place once per sub-group: the count would run 2x. Give each its own.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def remove_with(tag_dir: Path) -> None:
    """Delete a tag's cached universal copy along with the tag (checkpoint pruning)."""
    shutil.rmtree(tag_dir.with_name(universal_tag(tag_dir.name)), ignore_errors=True)
