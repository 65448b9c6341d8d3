"""`dbot-shards`: write WebDataset shards (+ manifest.json) for dbot-ds.

    dbot-shards synthetic --out data/synth --num 2000
    dbot-shards imagenet --src ILSVRC2012_img_train.tar --out data/in1k   # see dbot_ds.data.shard_writer
    dbot-shards folder --src photos/ --out data/photos
    dbot-shards digits --out data/digits --split train   # real labelled 8x8 digits (scikit-learn), see dbot_ds.data.digits
    dbot-shards manifest data/my_shards          # manifest.json for shards written by other tools

Each shard is ``shard-NNNNNN.tar`` holding samples ``{"__key__": "%08d", "jpg": JPEG bytes, "cls": int}``;
``manifest.json`` next to them records the sample counts that :func:`dbot_ds.data.manifest.dataset_size` reads:
``{"num_samples": N, "shards": [{"name": "shard-000000.tar", "num_samples": n}, ...]}``.

This module is the command line only, on top of the writers it runs: synthetic.py, digits.py, shard_writer.py
(`imagenet`, `folder`) and manifest.py (`manifest`; shard names and manifest.json for all of them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .digits import write_digits_shards
from .manifest import MANIFEST, shard_pattern, write_manifest_for
from .shard_writer import SKIPPED, ShardWriterError, index_folder, index_imagenet, plan_shards, write_shards
from .synthetic import write_synthetic_shards

# ------------------------------------------------------------------------------------------- CLI

def _cmd_synthetic(args: argparse.Namespace) -> int:
    manifest = write_synthetic_shards(args.out, args.num, img_size=args.img_size, per_shard=args.per_shard,
                                      seed=args.seed)
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.out}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    print(f"shard pattern: data.shards='{shard_pattern(args.out)}'")
    return 0


def _cmd_digits(args: argparse.Namespace) -> int:
    try:
        manifest = write_digits_shards(args.out, size=args.size, split=args.split)
    except ModuleNotFoundError as e:  # scikit-learn missing: the message names the install command
        raise SystemExit(f"dbot-shards digits: {e}") from None
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.out}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    print(f"shard pattern: data.shards='{shard_pattern(args.out)}'")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    manifest = write_manifest_for(args.dir)
    print(f"counted {manifest['num_samples']} samples in {len(manifest['shards'])} shards; wrote "
          f"{Path(args.dir) / MANIFEST}")
    return 0


# ------------------------------------------------------------------------- imagenet / folder (shard_writer.py)

def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the `imagenet` and `folder` subcommands to dbot-shards' subparsers."""
    p = commands.add_parser("imagenet", help="ImageNet-1K split (class folders or the train tar) -> labeled shards")
    p.add_argument("--src", required=True, help="class-folder split (train/n01440764/*.JPEG), "
                   "ILSVRC2012_img_train.tar (tar of per-class tars, read in place), or with --labels a flat "
                   "folder/tar of images")
    p.add_argument("--labels", help="for a flat split: lines 'FILE SYNSET' or Kaggle LOC_val_solution.csv")
    p.add_argument("--synsets", help="class list (a synsets.txt written for train) so the class indices match it")
    _add_common(p)
    p = commands.add_parser("folder", help="any folder of jpg/png/webp images (recursive) -> unlabeled shards")
    p.add_argument("--src", required=True, help="folder of images (or an uncompressed tar of them)")
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory; re-running the same command resumes it")
    p.add_argument("--per-shard", type=int, default=1000,
                   help="samples per shard (default 1000: ~110 MB shards at ImageNet's ~110 KB per image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="writer processes (default: all CPUs)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        if args.command == "imagenet":
            items, classes = index_imagenet(args.src, args.labels, args.synsets)
        else:
            items, classes = index_folder(args.src), None
        shards = plan_shards(items, args.per_shard, args.seed)
        print(f"indexed {len(items)} images" + (f" in {len(classes)} classes" if classes else "")
              + f" -> {len(shards)} shards of <= {args.per_shard}")
        summary = write_shards(shards, args.out, kind=args.command, seed=args.seed, per_shard=args.per_shard,
                               classes=classes, workers=args.workers, source=str(Path(args.src).resolve()))
    except ShardWriterError as exn:
        print(f"dbot-shards {args.command}: error: {exn}", file=sys.stderr)
        return 2
    _print_summary(Path(args.out), summary)
    return 0


def _print_summary(out_dir: Path, summary: dict) -> None:
    manifest, skipped = summary["manifest"], summary["skipped"]
    print(f"shards: {len(manifest['shards'])} in {out_dir} ({summary['written']} written, "
          f"{summary['reused']} already complete)")
    print(f"samples: {manifest['num_samples']}; skipped files: {len(skipped)}"
          + (f" (all in {out_dir / SKIPPED})" if skipped else ""))
    for name, reason in skipped[:5]:
        print(f"  {name}: {reason}")
    print(f"manifest: {out_dir / MANIFEST}")
    print(f"shard pattern: data.shards='{shard_pattern(out_dir)}'")


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbot-shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synthetic", help="procedural shapes-on-gradients JPEGs, for smoke tests")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--img-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synthetic)

    p = commands.add_parser("digits", help="scikit-learn's 1797 real 8x8 handwritten digits, upsampled (needs "
                            "scikit-learn)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--split", choices=["train", "val", "all"], default="train",
                   help="val: every 5th image; train: the rest, shuffled; all: both, shuffled (default train)")
    p.set_defaults(func=_cmd_digits)

    p = commands.add_parser("manifest", help="write manifest.json (sample counts) for existing .tar shards")
    p.add_argument("dir", help="folder holding the shards; manifest.json is written there")
    p.set_defaults(func=_cmd_manifest)
    add_commands(commands)  # `imagenet` and `folder`

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(cli())
