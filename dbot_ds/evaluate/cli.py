"""`dbot-eval`: how good is an encoder's representation? Weighted kNN (DINO) and a linear probe (MAE).

    dbot-eval knn --encoder exports/vit_h --train 'data/in1k_val/shard-{000000..000063}.tar'       # one set, split
    dbot-eval knn --encoder runs/vit_h --train 'data/in1k_sub/shard-{000000..000127}.tar' \
        --query 'data/in1k_val/shard-{000000..000063}.tar'                          # a run folder: exported first
    torchrun --nproc_per_node 8 -m dbot_ds.evaluate knn --encoder exports/vit_h --train ... --query ...   # 8 GPUs
    dbot-eval linear --encoder exports/vit_h --train ... --query ... --pool cls --epochs 90
    dbot-eval knn --encoder exports/tiny --train 'data/synth/shard-{000000..000003}.tar' --device cpu --limit 500

What it measures:
- Images: every sample of labelled webdataset shards (a `cls` key), centre-cropped to the encoder's input size
  (or --img-size); each rank decodes only its share (every world-size-th image) and keeps it in memory as uint8
  (`dbot_ds.evaluate.knn.load_shares`; --limit caps large sets).
  Without --query, every --query-every-th --train image is a query and the rest is the bank; with
  --leave-one-out (knn), every --train image is a query and all the others are its bank.
- Features: `forward_features` tokens [B, 1 + N, D] after the final norm, pooled ("mean" of the patch tokens and
  "cls") and L2-normalised, fp32 (`dbot_ds.evaluate.knn.extract`).
- knn: DINO's weighted kNN (k=20, T=0.07) for both pools, in percent rounded to 3 decimals. On a run's
  `stage_encoders/stageK` with the run's eval.* settings (monitor.py's docstring maps them to these options) these
  are exactly the four numbers of the online monitor's stage-end `eval` record for stage K: both score the fp32
  weights in fp32 through the same timm model, features (knn.gathered_features) and vote (knn.knn_scores).
- linear: MAE's linear-probe head (BatchNorm without affine, then Linear) on cached features; see
  `train_linear_probe` (probe.py).

Under torchrun / the deepspeed launcher (WORLD_SIZE > 1) each rank encodes its own share of both sets and
the features are all-gathered, so every rank holds all of them; rank 0 prints. The result is one JSON line on
stdout; progress and notes go to stderr. Bad input (no `cls` label, no query images, a bank smaller than k, an
--encoder that is neither an export nor a checkpoint) fails before any image is encoded, with exit code 2.

Needs torch, timm and safetensors; DeepSpeed only when --encoder is a checkpoint (its `zero_to_fp32` export).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dbot_ds.checkpoint.export import ExportError, load_encoder
from dbot_ds.checkpoint.export_cli import CheckpointRef, export, find_checkpoint

from .knn import POOLS, EvalDataError, Share, gathered_features, knn_scores, load_shares, num_batches
from .probe import train_linear_probe

DEFAULT_QUERY_EVERY = 5        # without --query: 20% of --train are queries


class EvalUsageError(ValueError):
    """An option that cannot work (before anything is computed); the message names the option and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Processes


def init_process_group(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). A process group only when launched with WORLD_SIZE > 1: gloo on CPU, NCCL on
    CUDA (cuda:LOCAL_RANK). `device` None: CUDA when there is one."""
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise EvalUsageError("--device cuda, but torch sees no CUDA device; use --device cpu or run on a GPU node")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Encoder


@dataclass
class EncoderSource:
    """What --encoder names, resolved without reading weights: an export (`export_dir`, `name`) or a checkpoint
    (`checkpoint`, exported when the model is needed). img_size, patch_size: the encoder's input geometry."""
    path: str
    img_size: int
    patch_size: int
    export_dir: Path | None = None
    name: str = "encoder"
    checkpoint: CheckpointRef | None = None

    @property
    def tag(self) -> str | None:
        return self.checkpoint.tag if self.checkpoint is not None else None


def resolve_encoder(path: str, tag: str | None = None) -> EncoderSource:
    """--encoder as an export folder (encoder.safetensors + encoder.json), one export file (`teacher.safetensors`
    of `--also-teacher`), or a run / checkpoints / tag folder. Reads only JSON; raises EvalUsageError otherwise."""
    p = Path(path).expanduser()
    export_dir, name = (p.parent, p.stem) if p.suffix in (".safetensors", ".json") else (p, "encoder")
    if (export_dir / f"{name}.safetensors").is_file():
        if tag is not None:
            raise EvalUsageError(f"--tag {tag} applies to checkpoints, but --encoder {path} is an export; drop --tag")
        info_file = export_dir / f"{name}.json"
        try:
            info = json.loads(info_file.read_text())
            return EncoderSource(path, int(info["img_size"]), int(info["patch_size"]), export_dir, name)
        except (OSError, ValueError, KeyError) as e:
            raise EvalUsageError(f"--encoder {path}: {info_file} is missing or not a dbot-export record ({e!r}); "
                                 "re-export it with `dbot-export RUN --out DIR`") from None
    try:
        ref = find_checkpoint(p, tag)
    except ExportError as e:
        raise EvalUsageError(
            f"--encoder {path} is neither an export (no {name}.safetensors) nor a checkpoint ({e}). Give a "
            "`dbot-export --out` folder, or a run folder / tag folder of dbot-pretrain") from None
    if ref.post_swap:          # export would refuse it too, but only after every image is loaded
        raise EvalUsageError(
            f"--encoder {path}: {ref.tag} is a stage-end checkpoint saved after the teacher swap, so its student is "
            "a fresh init. Export its teacher (`dbot-export RUN --tag TAG --which teacher --out DIR`) and pass "
            "--encoder DIR, or give an earlier --tag")
    mcfg = ref.model_cfg
    return EncoderSource(path, mcfg.img_size, mcfg.patch_size, checkpoint=ref)


def open_encoder(source: EncoderSource, device: torch.device, img_size: int, workdir: str, verbose: bool) -> nn.Module:
    """The encoder as a timm ViT in eval mode on `device`, taking img_size inputs. A checkpoint's student is first
    exported into `workdir` (DeepSpeed's zero_to_fp32, by every rank: no shared temp folder is assumed)."""
    export_dir, name = source.export_dir, source.name
    if source.checkpoint is not None:
        if verbose:
            print(f"[dbot-eval] --encoder {source.path} is a checkpoint ({source.tag}): exporting its student encoder "
                  f"to a temporary folder first (run `dbot-export` once to skip this)", file=sys.stderr)
        export(source.path, workdir, tag=source.tag, which="student")
        export_dir, name = Path(workdir), "encoder"
    if img_size == source.img_size:
        return load_encoder(export_dir, device, name)
    return _load_resized(export_dir, name, device)


def _load_resized(export_dir: Path, name: str, device: torch.device) -> nn.Module:
    """The export built with timm's dynamic_img_size: same weights (strict), position embeddings interpolated
    (bicubic) to whatever input size it is given."""
    import timm
    from safetensors.torch import load_file
    info = json.loads((export_dir / f"{name}.json").read_text())
    model = timm.create_model(info["timm_arch"], pretrained=False, num_classes=0, dynamic_img_size=True,
                              **info["timm_kwargs"])
    model.load_state_dict(load_file(str(export_dir / f"{name}.safetensors")), strict=True)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# Data


def load_sets(train: str, query: str | None, query_every: int, img_size: int, limit: int, rank: int = 0,
              world: int = 1) -> tuple[Share, Share]:
    """(bank, queries): this rank's share of each set's images as uint8 centre crops (items j with
    j % world == rank; only those are decoded) and every label. EvalDataError names --train / --query when a set
    is unusable."""
    sets = load_shares(train, img_size, key="--train", query_every=0 if query else query_every, rank=rank,
                       world=world, limit=limit)
    if query is not None:
        sets["query"] = load_shares(query, img_size, key="--query", rank=rank, world=world, limit=limit)["bank"]
    return sets["bank"], sets["query"]


def check_sets(bank: Share, query: Share, k: int | None, split: bool, leave_one_out: bool = False) -> None:
    """Refuse sets that cannot give a result, before any image is encoded. leave_one_out: query is bank, and each
    query's own image does not vote."""
    n_bank, n_query = len(bank.labels), len(query.labels)
    if n_query == 0:
        raise EvalUsageError("no query images; give --query PATTERN, or a --train set with images")
    if split and n_bank == 0:
        raise EvalUsageError(f"--train holds {n_query} image(s), all of them queries: the bank is empty; raise "
                             "--query-every or give more --train images")
    if k is not None and n_bank - leave_one_out < k:
        others = " other" if leave_one_out else ""
        raise EvalUsageError(f"--k {k} is more than the bank's {n_bank - leave_one_out}{others} images; lower --k or "
                             "give more --train images (raise --limit)")
    if k is None and n_bank < 2:
        raise EvalUsageError(f"the linear probe needs at least 2 --train images (batch norm), got {n_bank}")


# ----------------------------------------------------------------------------------------------------------
# Features


def features(model: nn.Module, data: Share, batch: int, rank: int, world: int, device: torch.device,
             bar: tqdm) -> dict[str, torch.Tensor]:
    """Pooled features of a whole set: each rank encodes its share, then all are gathered.
    Returns {"mean"/"cls": [n, D]} fp32 on `device`, in set order, on every rank."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        tokens = model.forward_features(images)          # [B, 1 + N, D], after the final norm
        bar.update()
        return tokens

    return gathered_features(forward, data, batch, rank, world, torch.float32, device)


def bank_and_query_features(model: nn.Module, bank: Share, query: Share, batch: int, rank: int,
                            world: int, device: torch.device) -> tuple[dict, dict]:
    """Features of both sets, with one progress bar (rank 0, stderr) over every forward of this rank."""
    total = num_batches(len(bank.labels), world, batch) + num_batches(len(query.labels), world, batch)
    with tqdm(total=total, desc="features", unit="batch", disable=rank != 0, file=sys.stderr) as bar:
        return (features(model, bank, batch, rank, world, device, bar),
                features(model, query, batch, rank, world, device, bar))


# ----------------------------------------------------------------------------------------------------------
# CLI


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _common_args() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--encoder", required=True,
                    help="a `dbot-export --out` folder (or its NAME.safetensors), or a run / checkpoints / tag folder "
                         "(its student encoder is exported to a temporary folder first)")
    ap.add_argument("--tag", default=None, help="checkpoint tag of a run folder (default: checkpoints/latest)")
    ap.add_argument("--train", required=True, help="labelled shards (a `cls` key): the kNN bank / the probe's "
                                                  "training set")
    query = ap.add_mutually_exclusive_group()
    query.add_argument("--query", default=None, help="labelled shards to score (default: split --train)")
    query.add_argument("--query-every", type=_positive, default=None,
                       help=f"without --query: --train image i is a query when i %% N == 0, the rest is the bank "
                            f"(default {DEFAULT_QUERY_EVERY})")
    ap.add_argument("--batch", type=_positive, default=64, help="images per forward, per rank (default 64)")
    ap.add_argument("--img-size", type=_positive, default=None,
                    help="crop size in pixels (default: the encoder's input size; another size interpolates its "
                         "position embeddings)")
    ap.add_argument("--limit", type=_non_negative, default=0, help="read at most N images of each set (default 0: all)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="dbot-eval", description=__doc__.splitlines()[0])
    evals = ap.add_subparsers(dest="eval", required=True)
    common = _common_args()
    knn = evals.add_parser("knn", parents=[common], help="DINO's weighted kNN, mean and cls pooling")
    knn.add_argument("--k", type=_positive, default=20, help="neighbours that vote (default 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    knn.add_argument("--leave-one-out", action="store_true",
                     help="every --train image is a query, voted on by all the others (no --query / --query-every): "
                          "scores a small labelled set on all its images instead of a held-out fifth")
    lin = evals.add_parser("linear", parents=[common], help="MAE's linear probe (SGD) on cached features")
    lin.add_argument("--pool", choices=POOLS, default="cls", help="features the head sees (default cls, as MAE)")
    lin.add_argument("--epochs", type=_positive, default=90)
    lin.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    lin.add_argument("--batch-size", type=_positive, default=256, help="features per SGD step (default 256)")
    lin.add_argument("--weight-decay", type=float, default=0.0)
    lin.add_argument("--seed", type=int, default=0, help="head init and shuffling (default 0)")
    return ap.parse_args(argv)


def _scores(args: argparse.Namespace, bank_f: dict, bank: Share, query_f: dict, query: Share) -> dict:
    if args.eval == "knn":
        return {"k": args.k, "temperature": args.temperature, "leave_one_out": args.leave_one_out,
                **knn_scores(bank_f, bank.labels, query_f, query.labels, args.k, args.temperature,
                             leave_one_out=args.leave_one_out)}
    probe = train_linear_probe(bank_f[args.pool], bank.labels, query_f[args.pool], query.labels, args.epochs,
                               args.lr, args.batch_size, args.weight_decay, args.seed)
    return {"pool": args.pool, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "weight_decay": args.weight_decay, "seed": args.seed, **probe}


def evaluate(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict | None:
    """Run one evaluation; returns the result record on rank 0 (None elsewhere). Every check comes before the
    first forward."""
    start = time.perf_counter()
    source = resolve_encoder(args.encoder, args.tag)
    img_size = args.img_size or source.img_size
    patch = source.patch_size
    if img_size % patch:
        raise EvalUsageError(f"--img-size {img_size} is not a multiple of the encoder's patch size {patch}; use "
                             f"e.g. {max(patch, img_size // patch * patch)}")
    loo = args.eval == "knn" and args.leave_one_out
    if loo and (args.query is not None or args.query_every is not None):
        raise EvalUsageError("--leave-one-out scores every --train image against the others: drop --query / "
                             "--query-every")
    query_every = 0 if loo else args.query_every or DEFAULT_QUERY_EVERY
    bank, query = load_sets(args.train, args.query, query_every, img_size, args.limit, rank, world)
    if loo:
        query = bank
    check_sets(bank, query, args.k if args.eval == "knn" else None, split=args.query is None and not loo,
               leave_one_out=loo)
    if rank == 0:
        print(f"[dbot-eval] {args.eval}: bank {len(bank.labels)} images, queries {len(query.labels)}, {img_size} px, "
              f"{world} rank(s) on {device.type}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="dbot-eval-") as workdir:
        model = open_encoder(source, device, img_size, workdir, verbose=rank == 0)
    if loo:                        # one set: encode it once
        with tqdm(total=num_batches(len(bank.labels), world, args.batch), desc="features", unit="batch",
                  disable=rank != 0, file=sys.stderr) as bar:
            bank_f = query_f = features(model, bank, args.batch, rank, world, device, bar)
    else:
        bank_f, query_f = bank_and_query_features(model, bank, query, args.batch, rank, world, device)
    if rank != 0:                  # every rank holds all features; one computes and prints
        return None
    scores = _scores(args, bank_f, bank, query_f, query)
    return {"eval": args.eval, "encoder": args.encoder, "tag": source.tag, "img_size": img_size,
            "num_bank": len(bank.labels), "num_query": len(query.labels),
            "num_classes": int(max(bank.labels.max(), query.labels.max())) + 1, **scores,
            "world_size": world, "seconds": round(time.perf_counter() - start, 2)}


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rank, world, device = init_process_group(args.device)
        try:
            result = evaluate(args, rank, world, device)
        finally:
            close_process_group()
    except (EvalUsageError, EvalDataError, ExportError) as e:
        # The same input reaches every rank, so every rank stops here; one says why.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dbot-eval: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
