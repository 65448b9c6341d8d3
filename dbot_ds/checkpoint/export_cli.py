"""`dbot-export`: a trained encoder out of a dbot-ds checkpoint, as a timm `VisionTransformer` (safetensors + JSON).

    dbot-export runs/vit_h --out exports/vit_h                        # newest complete checkpoint, student encoder
    dbot-export runs/vit_h --tag step00400000 --out exports/vit_h_s0  # one tag of a run
    dbot-export runs/vit_h/checkpoints/step00400000 --out e/          # a tag folder (or the checkpoints folder)
    dbot-export runs/vit_h --which teacher --out e/                   # the teacher of that checkpoint instead
    dbot-export runs/vit_h --also-teacher --out e/                    # student + teacher.safetensors/.json + teacher/
    dbot-export runs/vit_h --stage 0 --out e/                         # the encoder kept at the end of stage 0

The export format (`DIR/encoder.safetensors` + `DIR/encoder.json`, a timm VisionTransformer, and beside them timm's
Hub layout `DIR/config.json` + `DIR/model.safetensors`; the teacher's in `DIR/teacher/`: hub.py), its writers and
`load_encoder` are export.py; this module finds the checkpoint, reads its weights and runs the command.

How the weights are read:
- student: DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`, ZeRO-1/2/3, any world size) gives the
  fp32 master weights; the `encoder.` ones are kept, prefix stripped. The fixed sin-cos position embedding is a
  non-persistent buffer in training, so it is recomputed from the config and stored as timm's `pos_embed`.
- teacher: `teacher.pt` (the compute dtype, usually bf16), upcast to fp32. Without a final norm
  (`teacher.final_norm=false`, the default) the timm model is built with `final_norm=False`.

A stage-end checkpoint of an intermediate stage is taken after the swap: its student is freshly re-initialised
and its teacher is the stage's trained student without its final norm. Exporting its student is refused. The
whole trained encoder of every stage is kept by the trainer at the stage end, before the swap, as
`RUN/stage_encoders/stage{K}/` (an export folder): `--stage K` copies it.

Before either is read, the whole tag folder is verified (`safety.verify_tag`): every file must have the
size and SHA-256 recorded at save, and pass torch's weights-only unpickler with only DeepSpeed's own globals, since
`zero_to_fp32` unpickles the DeepSpeed files in full. `--trust-checkpoint` skips that scan for files you trust.

Only this module's `_consolidate_student` imports DeepSpeed; loading an export (export.py) needs only torch, timm and
safetensors (no pickle).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dbot_ds.config import ModelConfig

from .export import (ExportError, _check_against_encoder, _timm_export, _umask_mode, _write_export, export_paths,
                     load_encoder)
from .hub import write_hub
from .safety import CheckpointRefused, load_teacher_file, verify_tag
from .store import TAG_RE, complete_tags

# ----------------------------------------------------------------------------------------------------------
# Finding the checkpoint


@dataclass
class CheckpointRef:
    """One complete checkpoint: `<ckpt_dir>/<tag>/` and its COMPLETE record."""
    ckpt_dir: Path
    tag: str
    meta: dict

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def client(self) -> dict:
        return self.meta.get("client_state", {})

    @property
    def config(self) -> dict:
        return self.client["config"]

    @property
    def model_cfg(self) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in self.config["model"].items() if k in known})

    @property
    def step(self) -> int:
        return int(self.meta.get("step", self.client.get("step")))

    @property
    def stage(self) -> int:
        return int(self.meta.get("stage", self.client.get("stage")))

    @property
    def num_stages(self) -> int:
        lengths = self.client.get("plan_lengths")
        if lengths:
            return len(lengths)
        schedule = self.config.get("schedule", {})
        return len(schedule.get("stage_steps") or schedule.get("stage_epochs") or [])

    @property
    def run_finished(self) -> bool:
        """The final checkpoint: saved after the last stage ended (COMPLETE's stage is then num_stages, a stage
        that does not exist)."""
        return self.num_stages > 0 and self.stage >= self.num_stages

    @property
    def last_stage(self) -> int:
        """The stage this checkpoint belongs to: its recorded stage, or for the final checkpoint the last stage."""
        return min(self.stage, self.num_stages - 1) if self.num_stages else self.stage

    @property
    def post_swap(self) -> bool:
        """True for the stage-end checkpoint of an intermediate stage: saved after the swap, so the student is a
        fresh init and the teacher is the stage's trained student."""
        return bool(self.meta.get("stage_end")) and self.stage < self.num_stages

    def student_stage(self) -> int:
        """The stage whose student this checkpoint holds (final checkpoint: the last stage)."""
        return self.last_stage

    def teacher_source_stage(self) -> int | None:
        """The stage whose trained student the teacher is; None for stage 0's random initial teacher."""
        serving = self.last_stage                        # the stage this teacher teaches
        return serving - 1 if serving > 0 else None


def _incomplete_hint(ckpt_dir: Path) -> str:
    done = [t for _, t in complete_tags(ckpt_dir)]
    return f" Complete checkpoints in {ckpt_dir}: {', '.join(done)}." if done else \
        f" {ckpt_dir} has no complete checkpoint."


def find_checkpoint(path: str | os.PathLike, tag: str | None = None) -> CheckpointRef:
    """Resolve a run folder (`<run>/checkpoints/latest`, or `tag`), a checkpoints folder, or a tag folder to one
    complete checkpoint. Raises ExportError naming what is wrong and what exists."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportError(f"{p} does not exist; give a run folder (run.out_dir), its checkpoints/ folder, or a "
                          "tag folder such as <run>/checkpoints/step00001000")
    if not p.is_dir():
        raise ExportError(f"{p} is a file; give a run folder, its checkpoints/ folder, or a tag folder")
    is_tag = bool(TAG_RE.match(p.name)) or (p / "COMPLETE").exists() or any(p.glob("*_model_states.pt"))
    if is_tag:
        if tag and tag != p.name:
            raise ExportError(f"{p} is already the tag folder {p.name}; drop --tag {tag} or point at the run folder")
        ckpt_dir, tag = p.parent, p.name
    else:
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if not (ckpt_dir / "latest").exists() and not any(TAG_RE.match(d.name) for d in ckpt_dir.iterdir()):
            raise ExportError(f"no checkpoints found under {p}: expected a run folder holding checkpoints/, a "
                              "checkpoints folder holding stepNNNNNNNN/ tags, or a tag folder")
        if tag is None:
            latest = ckpt_dir / "latest"
            if latest.exists() and (ckpt_dir / latest.read_text().strip() / "COMPLETE").exists():
                tag = latest.read_text().strip()
            else:
                tags = complete_tags(ckpt_dir)
                if not tags:
                    raise ExportError(f"no complete checkpoint under {ckpt_dir} (none has a COMPLETE marker; a "
                                      "crash mid-save leaves it out).")
                tag = tags[-1][1]
                print(f"[dbot-export] {latest} is missing or names an incomplete checkpoint; using the newest "
                      f"complete one, {tag}", file=sys.stderr)
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise ExportError(f"checkpoint {tag_dir} does not exist." + _incomplete_hint(ckpt_dir))
    if not (tag_dir / "COMPLETE").exists():
        raise ExportError(f"checkpoint {tag_dir} is incomplete (no COMPLETE marker: the save was interrupted or is "
                          "still running) and cannot be exported." + _incomplete_hint(ckpt_dir))
    meta = json.loads((tag_dir / "COMPLETE").read_text())
    if "config" not in meta.get("client_state", {}):
        raise ExportError(f"{tag_dir / 'COMPLETE'} has no client_state.config; not a dbot-ds checkpoint?")
    return CheckpointRef(ckpt_dir, tag, meta)


# ----------------------------------------------------------------------------------------------------------
# Reading weights


def _consolidate_student(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """All of the student's fp32 master weights via DeepSpeed's `zero_to_fp32` (which prints progress: sent to
    stderr). Lazy mode, so under ZeRO-3 only the tensors asked for are gathered."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(str(ref.ckpt_dir), tag=ref.tag, lazy_mode=True)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ExportError(f"DeepSpeed could not consolidate {ref.path} (ZeRO stage "
                          f"{ref.client.get('zero_stage', '?')}): {e}") from e


def student_encoder_state(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The student encoder's fp32 weights, `encoder.` stripped (no pos_embed: it is a buffer)."""
    full = _consolidate_student(ref)
    # clone: under ZeRO-2 every tensor is a view into one merged flat vector (safetensors refuses shared storage)
    out = {k[len("encoder."):]: v.contiguous().detach().float().clone()
           for k, v in full.items() if k.startswith("encoder.")}
    if not out:
        raise ExportError(f"{ref.path} holds no 'encoder.' weights; not a dbot-ds student checkpoint?")
    return out


def verify(ref: CheckpointRef, trust: bool = False) -> None:
    """Sizes, SHA-256 and (unless `trust`) the pickle scan of every file of the tag, before zero_to_fp32 runs."""
    try:
        verify_tag(ref.path, trust)
    except CheckpointRefused as e:
        raise ExportError(str(e)) from None


def teacher_state(ref: CheckpointRef, trust: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
    """(depth, fp32 weights) of `teacher.pt` (weights-only unless `trust`)."""
    f = ref.path / "teacher.pt"
    if not f.exists():
        raise ExportError(f"{f} is missing")
    try:
        blob = load_teacher_file(f, trust)
    except CheckpointRefused as e:
        raise ExportError(str(e)) from None
    return int(blob["depth"]), {k: v.float().contiguous() for k, v in blob["state"].items()}


# ----------------------------------------------------------------------------------------------------------
# Export


def _prepare(ref: CheckpointRef, which: str, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, json record) of one encoder of the checkpoint; raises ExportError if not exportable."""
    mcfg = ref.model_cfg
    if which == "student":
        if ref.post_swap:
            raise ExportError(
                f"{ref.path} is the stage-end checkpoint of stage {ref.stage - 1}, saved after the teacher swap: its "
                f"student was just re-initialised for stage {ref.stage} and holds no trained weights. The whole trained "
                f"stage-{ref.stage - 1} encoder (fp32, final norm included) was kept by the run: `dbot-export RUN "
                f"--stage {ref.stage - 1}`. This checkpoint's teacher holds it without the final norm: use --which "
                "teacher (bf16, upcast to fp32), or export an earlier tag of that stage for its fp32 student.")
        state = student_encoder_state(ref)
        depth, final_norm, precision, source = mcfg.depth, True, "fp32 (DeepSpeed master weights)", ref.student_stage()
        _check_against_encoder(state, mcfg, depth, final_norm, "student encoder")
    else:
        depth, state = teacher_state(ref, trust)
        if depth == 0:
            raise ExportError(f"the teacher in {ref.path} has depth 0 (patch embedding + positions only, stage 0's "
                              "random teacher): it is not a ViT and cannot be exported as a timm model. Export "
                              "--which student, or a later checkpoint whose teacher is a trained student.")
        final_norm = "norm.weight" in state
        precision = f"{ref.config.get('optim', {}).get('precision', 'bf16')} (teacher.pt), upcast to fp32"
        source = ref.teacher_source_stage()
        _check_against_encoder(state, mcfg, depth, final_norm, "teacher")
        if source is None:
            print(f"[dbot-export] note: the teacher in {ref.path} is stage 0's random initial encoder, not a trained "
                  "one", file=sys.stderr)
    timm_state, info = _timm_export(state, mcfg, depth, final_norm)
    info.update({
        "which": which, "weights": precision, "trained_in_stage": source,
        # The stage the checkpoint belongs to (0 .. num_stages - 1): the final checkpoint, whose COMPLETE record
        # says stage == num_stages, is the last stage's, with run_finished true.
        "stage": ref.last_stage, "run_finished": ref.run_finished,
        "step": ref.step, "tag": ref.tag, "stage_end": bool(ref.meta.get("stage_end")),
        "num_stages": ref.num_stages, "zero_stage": ref.client.get("zero_stage"),
        "world_size": ref.client.get("world_size"), "checkpoint": str(ref.path.resolve()),
        "config": ref.config,
    })
    return timm_state, info


def export(path: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, which: str = "student",
           also_teacher: bool = False, force: bool = False, trust_checkpoint: bool = False) -> list[Path]:
    """Export one checkpoint's encoder (and optionally its teacher) to `out`; returns the written files.
    Everything is read and checked before anything is written; the tag is verified before anything is read
    (`trust_checkpoint` skips only the pickle scan)."""
    if which not in ("student", "teacher"):
        raise ExportError(f"--which must be 'student' or 'teacher', got {which!r}")
    ref = find_checkpoint(path, tag)
    out = Path(out)
    jobs = [("encoder", which)] + ([("teacher", "teacher")] if also_teacher and which != "teacher" else [])
    if not force:
        existing = [f for n, _ in jobs for f in export_paths(out, n) if f.exists()]
        if existing:
            raise ExportError(f"{', '.join(map(str, existing))} already exist; pass --force to overwrite")
    verify(ref, trust_checkpoint)
    prepared = [(name, *_prepare(ref, w, trust_checkpoint)) for name, w in jobs]
    written = []
    for name, state, info in prepared:
        written += _write_export(out, name, state, info)
    return written


def export_stage(run: str | os.PathLike, stage: int, out: str | os.PathLike, force: bool = False) -> list[Path]:
    """Copy the encoder the trainer kept at the end of `stage` (run/stage_encoders/stage{K}: fp32 master weights,
    final norm included) to `out`, after checking that it loads into its timm model."""
    src = Path(run) / "stage_encoders" / f"stage{stage}"
    if not (src / "encoder.json").exists():
        kept = sorted(p.name for p in (Path(run) / "stage_encoders").glob("stage*")) if Path(run).is_dir() else []
        raise ExportError(f"{src} does not exist: stage {stage} has not ended in this run (kept: {kept or 'none'}; "
                          "runs from before stage encoders were kept have none: export a checkpoint tag of that "
                          "stage instead). Give the run folder and a finished stage")
    out = Path(out)
    files = export_paths(out, "encoder")
    if not force and any(f.exists() for f in files):
        raise ExportError(f"{', '.join(str(f) for f in files if f.exists())} already exist; pass --force to overwrite")
    load_encoder(src)                                       # strict load: a truncated or foreign file fails here
    out.mkdir(parents=True, exist_ok=True)
    for f in files[:2]:
        tmp = f.with_name(f".{f.name}.tmp")
        shutil.copyfile(src / f.name, tmp)
        os.replace(tmp, f)
        os.chmod(f, _umask_mode())
    # the hub layout from the copy (also for stage folders kept before the trainer wrote config.json)
    return files[:2] + write_hub(out, "encoder", files[0], json.loads(files[1].read_text()))


# ----------------------------------------------------------------------------------------------------------
# CLI


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dbot-export",
        description="Export a trained encoder from a dbot-ds checkpoint as a timm VisionTransformer "
                    "(DIR/encoder.safetensors + DIR/encoder.json; beside them timm's Hugging Face Hub layout, "
                    "DIR/config.json + DIR/model.safetensors). Load it with dbot_ds.load_encoder(DIR), or "
                    "timm.create_model('local-dir:DIR', pretrained=True, num_classes=0).")
    ap.add_argument("path", help="run folder (uses checkpoints/latest), its checkpoints/ folder, or a tag folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tag", default=None, help="checkpoint tag (e.g. step00001000); default: checkpoints/latest")
    ap.add_argument("--which", choices=["student", "teacher"], default="student",
                    help="student: the fp32 student encoder (default); teacher: teacher.pt upcast to fp32")
    ap.add_argument("--stage", type=int, default=None,
                    help="the encoder kept at the end of stage K of the run (fp32, final norm included), instead of "
                         "a checkpoint's; PATH is the run folder")
    ap.add_argument("--also-teacher", action="store_true",
                    help="also write the teacher as teacher.safetensors + teacher.json, and in timm's hub layout "
                         "as teacher/config.json + teacher/model.safetensors")
    ap.add_argument("--force", action="store_true", help="overwrite existing export files in --out")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="read checkpoint files that hold pickled objects beyond DeepSpeed's own (normally refused, "
                         "as unpickling them can run code); only for files you trust. Sizes and SHA-256 are still "
                         "checked")
    args = ap.parse_args(argv)
    try:
        if args.stage is not None:
            if args.tag or args.which != "student" or args.also_teacher:
                raise ExportError("--stage takes the run folder alone: drop --tag, --which and --also-teacher")
            files = export_stage(args.path, args.stage, args.out, force=args.force)
        else:
            files = export(args.path, args.out, tag=args.tag, which=args.which, also_teacher=args.also_teacher,
                           force=args.force, trust_checkpoint=args.trust_checkpoint)
    except ExportError as e:
        print(f"dbot-export: error: {e}", file=sys.stderr)
        return 2
    info = json.loads(files[1].read_text())
    for f in files:
        print(f"[dbot-export] wrote {f}")
    print(f"[dbot-export] {describe(info)}: "
          f"timm.create_model({info['timm_arch']!r}, num_classes=0, **{info['timm_kwargs']}); "
          f"or dbot_ds.load_encoder({str(Path(args.out))!r})")
    print(f"[dbot-export] timm: timm.create_model('local-dir:{Path(args.out)}', pretrained=True, num_classes=0); "
          "publish the folder with huggingface_hub.upload_folder, then load it with 'hf-hub:OWNER/NAME'")
    return 0


def describe(info: dict) -> str:
    """Where an export's weights come from, from its encoder.json: e.g. 'student of step00000192 (stage 1
    (final), step 192)', 'teacher of step00000096 (stage 1, step 96; trained in stage 0)', 'student of the end of
    stage 0 (stage 0, step 96)'. Only stages that exist are named (0 .. num_stages - 1)."""
    stage = info["stage"]
    position = f"stage {stage}" + (" (final)" if info.get("run_finished") else "")
    source = info["tag"] or f"the end of stage {stage}"
    trained = info.get("trained_in_stage", stage)
    if trained != stage:
        position += f", step {info['step']}; " + ("stage 0's random initial encoder, not trained" if trained is None
                                                  else f"trained in stage {trained}")
    else:
        position += f", step {info['step']}"
    return f"{info['which']} of {source} ({position})"


if __name__ == "__main__":
    sys.exit(cli())
