r"""Fine-tune a `dbot-export` encoder for classification with timm, following the reference fine-tuning recipe.

    # ViT-B/16 as the reference: 4 nodes x 8 GPUs x 32 images = global batch 1024 (README: L, H, exact values)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m dbot_ds.finetune \
        exports/vit_b --train-shards 'data/in1k/train/shard-{000000..001023}.tar' --out finetune/vit_b
    # CPU smoke run on real digits (`dbot-shards digits --out data/digits`)
    python -m dbot_ds.finetune exports/tiny --train-shards 'data/digits/shard-{000000..000005}.tar' \
        --num-classes 10 --batch 16 --max-steps 5 --device cpu

Defaults: liuxingbin/dbot's ViT-B/16 fine-tune (main branch DOWNSTREAM.md over run.sh over main_finetune.py).
Patch tokens are average-pooled into a fresh LayerNorm (`fc_norm`, replacing the export's final norm, as the
reference does) and a linear head. timm supplies the rest: AdamW with layer-wise LR decay (`create_optimizer_v2`),
RandAug + random erasing (`create_transform`), Mixup/CutMix with label smoothing. LR per optimizer step: linear
warmup, half-cosine to min_lr (`dbot_ds.plan.stages.lr_at`). bf16 autocast on CUDA (the reference: fp16 + scaler).
One process, or one per GPU under torchrun (DDP; each rank resamples the shards with its own seed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import webdataset as wds

from dbot_ds.checkpoint.export import IMAGENET_MEAN, IMAGENET_STD, _export_files
from dbot_ds.data.manifest import dataset_size, expand_shards
from dbot_ds.plan.stages import lr_at, peak_lr

IMAGE = "jpg;jpeg;png;webp"


def build_model(export_dir: str, num_classes: int, *, drop_path: float = 0.1, global_pool: str = "avg",
                head_init_std: float = 0.01) -> tuple[torch.nn.Module, dict]:
    """(timm ViT with a fresh head: images [B, 3, H, W] -> logits [B, num_classes], the export's encoder.json)."""
    import timm
    from safetensors.torch import load_file
    st, js = _export_files(export_dir, "encoder")
    info = json.loads(js.read_text())
    # A teacher export has no final norm; the fine-tune model gets a fresh fc_norm (avg) or norm (token) anyway.
    kwargs = {k: v for k, v in info["timm_kwargs"].items() if k != "final_norm"}
    model = timm.create_model(info["timm_arch"], pretrained=False, num_classes=num_classes, global_pool=global_pool,
                              drop_path_rate=drop_path, **kwargs)
    state = load_file(str(st))
    if global_pool == "avg":      # the reference deletes the final norm and normalises the pooled tokens instead
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    encoder_missing = [k for k in missing if not k.startswith(("head.", "fc_norm.", "norm."))]
    if encoder_missing or unexpected:
        raise ValueError(f"{st} does not fit {info['timm_arch']}({kwargs}): missing {encoder_missing[:5]}, "
                         f"unexpected {unexpected[:5]}; re-export it with `dbot-export RUN --out DIR --force`")
    torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)
    torch.nn.init.zeros_(model.head.bias)
    return model, info


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float):
    """timm AdamW with layer-wise LR decay; each param group carries its `lr_scale` (see set_lr)."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, except that 0 bits (RandAug `inc1` at magnitude 10, about 1 image in 650 at m9-mstd0.5)
    gives black, as the reference's old Pillow did; Pillow 13 raises instead, ending the run at a random image."""
    from PIL import Image
    from timm.data.auto_augment import posterize
    return Image.new(img.mode, img.size) if bits_to_keep < 1 else posterize(img, bits_to_keep, **kwargs)


def train_transform(args, norm: dict, size: int):
    """timm's training transform (PIL image -> normalised [3, S, S]) with the posterize fix patched in."""
    from timm.data import create_transform
    from timm.data.auto_augment import posterize
    transform = create_transform(size, is_training=True, auto_augment=args.aa or None, color_jitter=None,
                                 re_prob=args.reprob, re_mode="pixel", re_count=1, **norm)
    for op in (op for t in transform.transforms for op in getattr(t, "ops", [])):
        if op.aug_fn is posterize:
            op.aug_fn = _posterize
    return transform


def loaders(args, info: dict, size: int) -> tuple[wds.WebLoader, wds.WebLoader | None]:
    """(endless shuffled train batches, one pass over the val shards or None): (images [B, 3, S, S], labels [B])."""
    from timm.data import create_transform
    norm = dict(mean=tuple(info.get("mean", IMAGENET_MEAN)), std=tuple(info.get("std", IMAGENET_STD)),
                interpolation="bicubic")
    train_tf = train_transform(args, norm, size)
    # Resampled shards seeded per rank and worker (webdataset's worker seed), so ranks read different samples.
    train = wds.DataPipeline(
        wds.ResampledShards(expand_shards(args.train_shards), seed=args.seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue), wds.shuffle(args.shuffle_buffer),
        wds.decode("pil", handler=wds.warn_and_continue), wds.to_tuple(IMAGE, "cls"),
        wds.map_tuple(train_tf, int), wds.batched(args.batch, partial=False))
    val = None
    if args.val_shards:
        val_tf = create_transform(size, is_training=False, crop_pct=224 / 256 if size <= 224 else 1.0, **norm)
        val = wds.DataPipeline(
            wds.SimpleShardList(expand_shards(args.val_shards)), wds.split_by_node, wds.split_by_worker,
            wds.tarfile_to_samples(), wds.decode("pil"), wds.to_tuple(IMAGE, "cls"), wds.map_tuple(val_tf, int),
            wds.batched(args.batch))
        val = wds.WebLoader(val, batch_size=None, num_workers=args.workers)
    return wds.WebLoader(train, batch_size=None, num_workers=args.workers), val


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: wds.WebLoader, device: torch.device) -> float:
    """Top-1 accuracy (%) over the val shards (split across ranks, summed)."""
    model.eval()
    counts = torch.zeros(2, device=device)
    for images, labels in val:
        labels = torch.as_tensor(labels, device=device)
        correct = (model(images.to(device)).argmax(-1) == labels).sum()
        counts += torch.stack([correct, torch.tensor(len(labels), device=device)])
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train()
    return 100.0 * counts[0].item() / max(1.0, counts[1].item())


def save(model: torch.nn.Module, info: dict, args, record: dict) -> None:
    """`out/model.safetensors` + `out/model.json`: loads with timm.create_model(timm_arch, **timm_kwargs)."""
    from safetensors.torch import save_file
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    kwargs = {k: v for k, v in info["timm_kwargs"].items() if k != "final_norm"}
    kwargs.update(num_classes=args.num_classes, global_pool=args.global_pool)
    (out / "model.json").write_text(json.dumps({"timm_arch": info["timm_arch"], "timm_kwargs": kwargs,
                                                "export": str(args.export), "args": vars(args), **record}, indent=2))


def schedule(args, world: int) -> dict:
    """Optimizer steps and LR of the run: global batch, steps per epoch, total and warmup steps, peak LR."""
    global_batch = args.batch * args.accum_iter * world
    per_epoch = dataset_size(args.train_shards) // global_batch
    if per_epoch < 1:
        raise ValueError(f"{args.train_shards} holds fewer images than one global batch ({global_batch} = batch x "
                         "accum-iter x processes): lower --batch or --accum-iter")
    return dict(global_batch=global_batch, steps_per_epoch=per_epoch, total_steps=args.epochs * per_epoch,
                warmup_steps=round(args.warmup_epochs * per_epoch), peak_lr=args.lr or peak_lr(args.blr, global_batch))


def objective(args):
    """(Mixup/CutMix or None, loss); with mixing, label smoothing lives in Mixup's soft targets."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.mixup <= 0 and args.cutmix <= 0:
        return None, LabelSmoothingCrossEntropy(args.smoothing)
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                 num_classes=args.num_classes), SoftTargetCrossEntropy()


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): a process group under torchrun (WORLD_SIZE > 1), nothing otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world == 1:
        return 0, 1, dev
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    return dist.get_rank(), world, dev


def train(args) -> dict:
    """Fine-tune; returns the last log record {"step", "epoch", "train_loss", "lr", "img_per_s", "val_acc1"}."""
    rank, world, device = init_distributed(args.device)
    try:
        return _train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world: int, device: torch.device) -> dict:
    torch.manual_seed(args.seed + rank)
    model, info = build_model(args.export, args.num_classes, drop_path=args.drop_path, global_pool=args.global_pool)
    model.to(device).train()
    plan = schedule(args, world)
    optimizer = build_optimizer(model, plan["peak_lr"], args.weight_decay, args.layer_decay)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    mixup, criterion = objective(args)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    train_batches, val = loaders(args, info, model.patch_embed.img_size[0])
    batches, steps = iter(train_batches), min(plan["total_steps"], args.max_steps or plan["total_steps"])
    loss_sum, t0, logged_at, record = torch.zeros((), device=device), time.time(), 0, {}
    for step in range(steps):
        lr = lr_at(step, peak=plan["peak_lr"], min_lr=args.min_lr, warmup_steps=plan["warmup_steps"],
                   stage_steps=plan["total_steps"])
        set_lr(optimizer, lr)
        for micro in range(args.accum_iter):
            images, labels = next(batches)
            images, labels = images.to(device), torch.as_tensor(labels, device=device)
            if mixup:
                images, labels = mixup(images, labels)
            # DDP all-reduces gradients only on the last micro-batch of an accumulated step.
            sync = ddp.no_sync() if world > 1 and micro < args.accum_iter - 1 else contextlib.nullcontext()
            with sync, autocast:
                loss = criterion(ddp(images), labels) / args.accum_iter
            loss.backward()
            loss_sum += loss.detach()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        epoch_end, last = (step + 1) % plan["steps_per_epoch"] == 0, step + 1 == steps
        if (step + 1) % args.log_every and not (epoch_end or last):
            continue
        loss_value = loss_sum.item() / (step + 1 - logged_at)        # the only host sync: once per log line
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}: lower --blr, set --clip-grad 1.0, or "
                                     "check the export and the shards' labels")
        record = {"step": step + 1, "epoch": (step + 1) / plan["steps_per_epoch"], "train_loss": loss_value,
                  "lr": lr, "img_per_s": (step + 1 - logged_at) * plan["global_batch"] / (time.time() - t0)}
        if val is not None and (epoch_end or last):
            record["val_acc1"] = evaluate(model, val, device)
        if rank == 0:
            print(json.dumps(record), flush=True)
            if args.out and (epoch_end or last):
                save(model, info, args, record)
        loss_sum.zero_()
        t0, logged_at = time.time(), step + 1
    return record


# The reference ViT-B/16 recipe (liuxingbin/dbot main: DOWNSTREAM.md over run.sh over main_finetune.py defaults);
# README "Fine-tuning an exported encoder" gives the L and H values. Each key is a flag: batch -> --batch.
RECIPE = dict(batch=32, accum_iter=1, epochs=100, warmup_epochs=5.0, blr=3e-4, lr=0.0, min_lr=1e-6,
              layer_decay=0.65, weight_decay=0.05, drop_path=0.1, clip_grad=0.0, reprob=0.25, mixup=0.8, cutmix=1.0,
              smoothing=0.1, aa="rand-m9-mstd0.5-inc1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--batch is per process and micro-step (global batch = batch x accum-iter x processes); --lr (absolute)
    overrides --blr when > 0; --clip-grad 0 is no clipping; --aa '' turns RandAug off."""
    ap = argparse.ArgumentParser(prog="python -m dbot_ds.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("export", help="a `dbot-export --out` folder (encoder.safetensors + encoder.json)")
    ap.add_argument("--train-shards", required=True, help="webdataset shards with jpg + cls, manifest.json beside")
    ap.add_argument("--val-shards", default="", help="evaluated (top-1) at each epoch end and at the last step")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--out", default="", help="folder for model.safetensors + model.json (rank 0, each epoch)")
    ap.add_argument("--global-pool", choices=["avg", "token"], default="avg", help="token: the reference --cls_token")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke runs); 0: all")
    for name, default in RECIPE.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"(default {default})")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8, help="data loader processes per rank")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="", help="cpu or cuda; default: cuda when available")
    args = ap.parse_args(argv)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch % 2:
        ap.error(f"--batch {args.batch} is odd: Mixup/CutMix pair each batch with its reverse; use an even batch")
    return args


def cli(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
