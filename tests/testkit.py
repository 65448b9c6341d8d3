"""Helpers shared by test modules in different folders and by the probe scripts the tests launch: shards of
coloured samples whose ids survive crops (the loader, stall and reshard tests), transformers' own CLIP
features (the CLIP teacher tests and their 2-process probe), and a finished checkpoint without DeepSpeed's files
(the export tests)."""
from __future__ import annotations

import io
import itertools
import json
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from dbot_ds.data.stream import build_train_loader

COUNTS = [7, 13, 10, 9, 11, 10]          # 60 samples in 6 shards of unequal size


def colour_jpeg(i: int, size: int = 40) -> bytes:
    rgb = (16 * (i % 16) + 8, 16 * (i // 16 % 16) + 8, 128)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def ids_of(images: torch.Tensor) -> list[int]:
    """Recover each image's id from its mean colour."""
    mean = images.float().mean(dim=(2, 3))
    r, g = ((mean[:, 0] - 8) / 16).round().long(), ((mean[:, 1] - 8) / 16).round().long()
    return (r + 16 * g).tolist()


def write_shards(folder: Path, counts=COUNTS, extra: dict | None = None) -> str:
    """Shards of colour samples with a manifest; `extra` maps sample id -> replacement sample fields."""
    folder.mkdir(parents=True, exist_ok=True)
    i, entries = 0, []
    for s, n in enumerate(counts):
        name = f"part-{s:03d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(n):
                sample = {"__key__": f"{i:05d}", "jpg": colour_jpeg(i), "cls": i}
                if extra and i in extra:
                    sample = {"__key__": f"{i:05d}", **extra[i]}
                sink.write(sample)
                i += 1
        entries.append({"name": name, "num_samples": n})
    (folder / "manifest.json").write_text(json.dumps({"num_samples": sum(counts), "shards": entries}))
    return f"{folder}/part-{{000..{len(counts) - 1:03d}}}.tar"


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging."""
    def boom(*_):
        raise TimeoutError(f"no result within {seconds} s: the loader hangs")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def take(pattern: str, n: int, **kw) -> list[tuple[torch.Tensor, int]]:
    args = dict(img_size=16, micro_batch=4, num_workers=0, seed=0, rank=0, world_size=1, shuffle_buffer=8)
    with deadline(60):
        return list(itertools.islice(iter(build_train_loader(pattern, **{**args, **kw})), n))


def clip_reference(model, images_imagenet_normalised, layer=-1):
    """What transformers computes for the same images (CLIP's own normalisation)."""
    mean_in, std_in = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    raw = images_imagenet_normalised * std_in.view(1, 3, 1, 1) + mean_in.view(1, 3, 1, 1)
    out = model(pixel_values=(raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), output_hidden_states=True)
    return out.last_hidden_state if layer < 0 else out.hidden_states[layer]


def fake_checkpoint(ckpt_dir: Path, step: int, stage: int, stage_end: bool, lengths=(96, 96)) -> Path:
    """A tag folder as the trainer writes it (COMPLETE record, teacher.pt, files recorded by ckpt_safety), without
    DeepSpeed's files: the tests replace `_consolidate_student` (the only DeepSpeed read) by `fake_student`."""
    from dbot_ds.checkpoint.safety import main as ckpt_safety
    from dbot_ds.config import build_config
    from dbot_ds.model.vit import Encoder
    cfg = build_config({"schedule.stage_steps": list(lengths), "optim.precision": "fp32"})   # vit_tiny_patch4, 32 px
    tag = ckpt_dir / f"step{step:08d}"
    tag.mkdir(parents=True)
    client = {"step": step, "stage": stage, "plan_lengths": list(lengths), "zero_stage": 2, "world_size": 1,
              "config": cfg.to_dict()}
    (tag / "COMPLETE").write_text(json.dumps({"step": step, "stage": stage, "stage_end": stage_end,
                                              "client_state": client}))
    torch.manual_seed(1)
    teacher = Encoder(cfg.model, cfg.model.depth, final_norm=False).state_dict()
    torch.save({"depth": cfg.model.depth, "state": {k: v.to(torch.bfloat16) for k, v in teacher.items()}},
               tag / "teacher.pt")
    assert ckpt_safety(["record", str(tag)]) == 0
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


def resume_check(run_dir: Path, overrides: list[str]):
    """What a start of `--preset demo` + `overrides` decides about resuming `run_dir`'s newest checkpoint, checked
    in this process as the start's preflight does (no launch: the refusals cost no process start-up): the stage
    plan to continue with, or check_resume's ConfigError. Precision fp32, as the tests train."""
    from conftest import last_wins

    from dbot_ds.checkpoint import store
    from dbot_ds.checkpoint.resume import check_resume
    from dbot_ds.config import load_config
    from dbot_ds.data.dataset import resolve_dataset
    from dbot_ds.plan.stages import make_plan
    cfg = load_config(preset="demo", overrides=last_wins(["optim.precision=fp32", *overrides]))
    dataset = resolve_dataset(cfg, 0, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = store.find_resume_tag(ckpt_dir)
    plan = make_plan(cfg, dataset.num_samples // cfg.optim.global_batch)
    return check_resume(cfg, store.read_meta(ckpt_dir, tag), 1, 2, tag, plan, dataset)
