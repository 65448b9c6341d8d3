"""`dbot-bench repro --loop minimal`: the miniature's two stages in a plain PyTorch loop, beside the trainer.

The same model, objective, decay groups, LR plan, seeds and stage-end swap as `dbot-pretrain` (teacher <- the
student's encoder, student re-initialised from `mix_seed(seed, stage)`, one AdamW whose moments cross the
swap), but none of the trainer's machinery: no DeepSpeed, no webdataset stream, no JPEG decode per step. The
images are the labelled digits decoded once ([N, 3, 32, 32] uint8, as `dbot-eval` reads them); each step draws
`batch` of them in exact epochs and cuts one RandomResizedCrop per image (torchvision). If this loop shows a
gain the trainer does not, the difference is in the trainer; if it shows the same numbers, it is not.
Each switch in `ABLATIONS` changes one thing, for the ablation table of BENCHMARKS.md."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from dbot_ds.checkpoint.export import write_stage_encoder
from dbot_ds.data.augment import normalize
from dbot_ds.data.stream import mix_seed
from dbot_ds.model.objective import loss_fn
from dbot_ds.model.vit import build_student, build_teacher, param_groups, teacher_state_from_student
from dbot_ds.plan.stages import make_plan

# One change at a time against the trainer's settings (`--ablate NAME`).
ABLATIONS = {
    "none": "the trainer's settings",
    "decay_all": "weight decay on every parameter (biases and norms included)",
    "square": "square crops (aspect ratio 1) instead of 3/4-4/3",
    "no_normalize": "pixels / 255 - 0.5 instead of ImageNet mean and std",
    "keep_student": "no re-initialisation at the swap: stage 1 continues from the stage-0 student",
    "same_init": "the stage-1 student re-initialised to the stage-0 student's initial weights (same seed)",
    "other_teacher": "the stage-0 teacher from another random init than the student's (seed + 1000)",
    "trainer_stream": "the trainer's batches: its webdataset loader (build_train_loader) with the run's data.*",
}


def _crop(cfg, ablate: str) -> v2.Transform:
    d = cfg.data
    ratio = (1.0, 1.0) if ablate == "square" else (3 / 4, 4 / 3)
    mode = InterpolationMode.BILINEAR if d.interpolation == "bilinear" else InterpolationMode.BICUBIC
    steps = [v2.RandomResizedCrop(cfg.model.img_size, scale=tuple(d.crop_scale), ratio=ratio, interpolation=mode,
                                  antialias=True)]
    return v2.Compose(steps + ([v2.RandomHorizontalFlip()] if d.hflip else []))


def _inputs(images: torch.Tensor, ablate: str) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] as the student and teacher see it."""
    return images.float() / 255 - 0.5 if ablate == "no_normalize" else normalize(images)


def _batches(images: torch.Tensor, batch: int, crop: v2.Transform, g: torch.Generator):
    """Endless uint8 [batch, 3, H, W] batches: every image once per epoch (the trainer's data.resampled=false),
    each cropped on its own."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(images), generator=g)])
        idx, order = order[:batch], order[batch:]
        yield torch.stack([crop(images[i]) for i in idx.tolist()])


def _trainer_batches(cfg, shards: str):
    """The uint8 [batch, 3, S, S] batches `dbot-pretrain` would train on (one process): the same loader, seed
    and data.* settings as Preflight builds (a fresh stream from epoch 0)."""
    from dbot_ds.data.augment import Augment
    from dbot_ds.data.stream import build_train_loader
    d = cfg.data
    loader = build_train_loader(shards, img_size=cfg.model.img_size, micro_batch=cfg.optim.global_batch,
                                num_workers=d.num_workers, seed=cfg.run.seed if not d.resampled else
                                mix_seed(cfg.run.seed, 0), rank=0, world_size=1, resampled=d.resampled,
                                shuffle_buffer=d.shuffle_buffer, open_shards=d.open_shards,
                                augment=Augment(tuple(d.crop_scale), d.hflip, d.interpolation, d.color_jitter))
    return (batch for batch, _ in loader)


def _teacher(cfg, depth: int, encoder_state: dict) -> torch.nn.Module:
    teacher = build_teacher(cfg.model, depth, final_norm=cfg.teacher.final_norm)
    teacher.load_state_dict(teacher_state_from_student(encoder_state, teacher), strict=False)
    return teacher


def _encoder_state(student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.encoder.named_parameters()}


def initial_student(cfg, out: Path) -> torch.nn.Module:
    """The student both loops start from (seeded as the trainer seeds it), its encoder written to out/init."""
    student = build_student(cfg.model, seed=mix_seed(cfg.run.seed, 0))
    write_stage_encoder(_encoder_state(student), cfg, out / "init", stage=-1, step=0)
    return student


def train_two_stages(cfg, images: torch.Tensor, out: Path, ablate: str = "none", shards: str = "") -> None:
    """Train every stage of `cfg`'s plan on uint8 `images` [N, 3, H, W]; write the initial and each stage-end
    encoder to out/{init, stage0, stage1, ...} as `write_stage_encoder` export folders (what `dbot-eval` reads).
    `shards`: the same images as webdataset shards, read only by the trainer_stream ablation."""
    if ablate not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablate!r}; choose one of {sorted(ABLATIONS)}")
    if ablate == "trainer_stream" and not shards:
        raise ValueError("the trainer_stream ablation reads the shards: pass shards=PATTERN")
    seed, o = cfg.run.seed, cfg.optim
    torch.manual_seed(seed)                                # torchvision's crop parameters draw from it
    plan = make_plan(cfg, 0)
    student = initial_student(cfg, out).train()
    first = build_student(cfg.model, seed=mix_seed(seed + 1000, 0)) if ablate == "other_teacher" else student
    teacher = _teacher(cfg, plan.teacher_depths[0], _encoder_state(first))
    groups = param_groups(student, o.weight_decay)
    if ablate == "decay_all":
        groups = [{"params": [p for g in groups for p in g["params"]], "weight_decay": o.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps)
    loss_of, crop = loss_fn(cfg), _crop(cfg, ablate)
    batches = (_trainer_batches(cfg, shards) if ablate == "trainer_stream"
               else _batches(images, o.global_batch, crop, torch.Generator().manual_seed(seed)))
    for step in range(plan.total_steps):
        for g in opt.param_groups:
            g["lr"] = plan.lr(step)
        x = _inputs(next(batches), ablate)
        with torch.no_grad():
            target = teacher(x)
        pred, mask = student(x)
        loss = loss_of(pred, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if plan.is_stage_end(step + 1):
            stage, _ = plan.locate(step)
            state = _encoder_state(student)
            write_stage_encoder(state, cfg, out / f"stage{stage}", stage=stage, step=step + 1)
            if stage + 1 < plan.num_stages:
                teacher = _teacher(cfg, plan.teacher_depths[stage + 1], state)
                if ablate != "keep_student":                # in place: AdamW keeps its moments, as the reference
                    fresh = build_student(cfg.model, seed=mix_seed(seed, 0 if ablate == "same_init" else stage + 1))
                    with torch.no_grad():
                        for p, q in zip(student.parameters(), fresh.parameters()):
                            p.copy_(q)
