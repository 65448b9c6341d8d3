"""What the checkpoint safety costs (checkpoint/safety.py): SHA-256 at save, and hashes + pickle scan at resume/export,
on a synthetic tag folder laid out as DeepSpeed 0.19.8 writes ZeRO-2 bf16 for a real architecture.

    python -m dbot_ds.bench.ckpt --arch vit_huge_patch14 --world 32 --dir /tmp/ckpt_bench    # ~10.6 GB on disk

Files (sizes from the architecture's student and teacher): `mp_rank_00_model_states.pt` (bf16 weights, one tensor
per parameter, rank 0's), `world` optimizer shards `bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt` (fp32 master
+ two AdamW moments, 12 bytes a parameter over all of them), `teacher.pt` (bf16 encoder, written through the
hashing writer as checkpoint.save does). The contents are zeros: hashing and scanning cost the same on any bytes.

Reported, in seconds: what the slowest rank adds to a save (rank 0: model states and its own shard, in threads;
teacher.pt is hashed while written, so its cost is the write with the hash minus the write without), what rank 0
adds to a resume, a whole single-process verify (dbot-export), and each once more from disk after the files are
dropped from the page cache (`posix_fadvise`, only these files). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dbot_ds.checkpoint.safety import HashingWriter, check_share, record_files, tag_files
from dbot_ds.config import ARCHS, ModelConfig
from dbot_ds.model.vit import build_student


def param_shapes(arch: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(student, student encoder) parameter shapes of `arch`, built on the meta device."""
    with torch.device("meta"):
        student = build_student(ModelConfig(arch=arch, **ARCHS[arch]))
    shapes = {k: tuple(v.shape) for k, v in student.named_parameters()}
    return shapes, {k: s for k, s in shapes.items() if k.startswith("encoder.")}


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def write_tag(tag_dir: Path, shapes: dict, encoder: dict, world: int) -> dict:
    """The synthetic tag folder; returns {'teacher.pt': record} and the teacher write times with/without hash."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}},
               tag_dir / "mp_rank_00_model_states.pt")
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    part = -(-numel // world)
    for r in range(world):
        flat = {k: torch.zeros(part) for k in ("fp32", "exp_avg", "exp_avg_sq")}
        torch.save({"optimizer_state_dict": flat}, tag_dir / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    teacher = {"depth": 0, "state": {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in encoder.items()}}
    plain, _ = _timed(lambda: _fsynced_save(teacher, tag_dir / "teacher.pt", hashed=False))
    hashed, rec = _timed(lambda: _fsynced_save(teacher, tag_dir / "teacher.pt", hashed=True))
    return {"teacher": rec, "teacher_write_s": plain, "teacher_write_hashed_s": hashed}


def _fsynced_save(obj, path: Path, hashed: bool) -> dict | None:
    with open(path, "wb") as f:
        writer = HashingWriter(f) if hashed else f
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.record() if hashed else None


def drop_cache(tag_dir: Path) -> None:
    """Evict these files (only) from the page cache, so the next read comes from disk."""
    for name in tag_files(tag_dir):
        fd = os.open(tag_dir / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(tag_dir: Path, world: int, teacher: dict) -> dict:
    """Seconds per operation, page cache warm (as right after the save) and cold (from disk)."""
    files = record_files(tag_dir, known={"teacher.pt": teacher})         # the COMPLETE record, one process
    steps = {
        "save_rank0_hash_s": lambda: record_files(tag_dir, 0, world, known={"teacher.pt": teacher}),
        "save_rank1_hash_s": lambda: record_files(tag_dir, 1 % world, world),
        "resume_rank0_s": lambda: check_share(tag_dir, files, 0, world),     # hashes + scan of rank 0's share
        "export_verify_s": lambda: check_share(tag_dir, files, 0, 1),        # every file, one process
    }
    out = {}
    for cache in ("warm", "cold"):
        for name, step in steps.items():
            if cache == "cold":
                drop_cache(tag_dir)
            out[f"{name}_{cache}"], result = _timed(step)
            assert not isinstance(result, list) or not result, result        # no problem found
    out["scan_only_all_files_s"], _ = _timed(lambda: check_share(tag_dir, None, 0, 1))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m dbot_ds.bench.ckpt", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_huge_patch14", choices=sorted(ARCHS))
    ap.add_argument("--world", type=int, default=32, help="ranks that wrote the checkpoint (optimizer shards)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dbot_bench_ckpt"), help="scratch folder (removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args(argv)
    shapes, encoder = param_shapes(args.arch)
    tag_dir = args.dir / "step00000001"
    try:
        t_write, written = _timed(lambda: write_tag(tag_dir, shapes, encoder, args.world))
        sizes = {n: (tag_dir / n).stat().st_size for n in tag_files(tag_dir)}
        result = {"arch": args.arch, "world": args.world,
                  "student_params": sum(torch.Size(s).numel() for s in shapes.values()),
                  "files": len(sizes), "total_gb": sum(sizes.values()) / 1e9,
                  "rank0_hashed_gb_at_save": (sizes["mp_rank_00_model_states.pt"] +
                                              sizes["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]) / 1e9,
                  "write_all_s": t_write, "teacher_write_s": written["teacher_write_s"],
                  "teacher_write_hashed_s": written["teacher_write_hashed_s"],
                  **measure(tag_dir, args.world, written["teacher"]), "cpus": os.cpu_count()}
    finally:
        if not args.keep:
            shutil.rmtree(tag_dir, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:32s} {v:.2f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
