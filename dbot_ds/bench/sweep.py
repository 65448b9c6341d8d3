"""`dbot-bench sweep` and `dbot-bench table`: many `dbot-bench step` cases in one process, and their table.

    dbot-bench sweep launch/gpu_cases.txt --out $OUT/steps.jsonl --deadline-s 420
    dbot-bench table $OUT/steps.jsonl > $OUT/steps.md

Made for a GPU lent for minutes: the imports, the CUDA context and the process group are paid once, not per
case. Each non-comment line of the cases file is `NAME: ARGS`, ARGS being `dbot-bench step`'s arguments.
Cases run in file order (most wanted first). Each result, or its error, is appended to the JSONL as soon as it
is known, so a time limit loses only the case in flight; no case starts after `--deadline-s`. A case that runs
out of GPU memory is retried at 3/4 of its micro-batch, down to `--min-micro-batch` (the row records the
micro-batch that fitted and the one asked for). `--micro-batch 0` asks for the largest one dbot-plan fits on the
device. Every row carries dbot-plan's prediction for the same
setting and its error against the measured process peak (`peak_process_gib`, see bench_step._peak).
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
import traceback
from pathlib import Path

import torch

from . import step as bench_step


def read_cases(path: str) -> list[tuple[str, argparse.Namespace]]:
    """[(name, parsed `dbot-bench step` args)]; a bad line fails here, before any case runs."""
    parser = argparse.ArgumentParser(prog="dbot-bench step", exit_on_error=False)
    bench_step.add_arguments(parser)
    cases, names = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, args = line.partition(":")
        name = name.strip()
        if not sep or not name or " " in name:
            raise SystemExit(f"{path}:{n}: expected 'NAME: dbot-bench step arguments', got {line!r}")
        if name in names:
            raise SystemExit(f"{path}:{n}: case name '{name}' is used twice")
        try:
            a, unknown = parser.parse_known_args(shlex.split(args))
        except argparse.ArgumentError as e:
            raise SystemExit(f"{path}:{n} ({name}): {e}") from None
        if unknown:
            raise SystemExit(f"{path}:{n} ({name}): unknown arguments {unknown}")
        names.add(name)
        cases.append((name, a))
    if not cases:
        raise SystemExit(f"{path}: no cases")
    return cases


def _plan_setting(a: argparse.Namespace, world: int):
    """(model config, dbot-plan keyword arguments) of a case."""
    cfg = bench_step._config(argparse.Namespace(**{**vars(a), "micro_batch": max(a.micro_batch, 1)}), world)
    ds = cfg.deepspeed.config
    kw = dict(zero=int(ds[4]) if ds.startswith("zero") else 2, world=world, ckpt_every=a.ckpt, teacher=a.teacher,
              teacher_depth=None if a.teacher_depth == "full" else int(a.teacher_depth), offload=ds == "zero3_offload")
    return cfg.model, kw


def plan_for(a: argparse.Namespace, world: int) -> dict:
    """dbot-plan's per-rank memory for the case's setting: {'plan_gib': total, 'plan_parts_gib': {...}}."""
    from dbot_ds.plan.memory import plan
    model, kw = _plan_setting(a, world)
    gib = plan(model, micro_batch=a.micro_batch, **kw).gib()
    return {"plan_gib": gib["total"], "plan_parts_gib": gib}


AUTO_SHARE = 0.95          # of the device's memory that `--micro-batch 0` plans to fill
AUTO_MAX = 1024            # ... up to this: beyond, a ViT's step gains nothing and each OOM retry costs more


def auto_micro_batch(a: argparse.Namespace, world: int, device_gib: float) -> int:
    """`--micro-batch 0`: the largest micro-batch dbot-plan fits in AUTO_SHARE of the device, rounded down to a
    multiple of 32, between 8 and AUTO_MAX. Too large a guess costs OOM retries at 3/4; the row shows what fitted."""
    from dbot_ds.plan.memory import max_micro_batch
    model, kw = _plan_setting(a, world)
    return min(AUTO_MAX, max(8, max_micro_batch(model, AUTO_SHARE * device_gib, **kw) // 32 * 32))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_case(name: str, a: argparse.Namespace, world: int, device: torch.device, min_micro_batch: int) -> dict:
    """Measure one case, stepping its micro-batch down on OOM; errors become a row, never an exception."""
    asked, t0 = a.micro_batch, time.perf_counter()
    if a.micro_batch <= 0:
        if device.type != "cuda":
            return {"name": name, "error": "--micro-batch 0 (as large as dbot-plan fits) needs a GPU", "micro_batch": 0}
        a.micro_batch = auto_micro_batch(a, world, torch.cuda.mem_get_info(device)[1] / bench_step.GIB)
        asked = f"auto: {a.micro_batch}"
    while True:
        try:
            row = bench_step.measure(a, world, device)
            break
        except Exception as e:  # noqa: BLE001 - a sweep must go on to the next case
            bench_step.free_memory(device)
            smaller = (a.micro_batch * 3 // 4) // 8 * 8
            if _is_oom(e) and smaller >= min_micro_batch:
                print(f"[sweep] {name}: out of memory at micro-batch {a.micro_batch}; trying {smaller}", flush=True)
                a.micro_batch = smaller
                continue
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "traceback": traceback.format_exc(limit=-8), "micro_batch": a.micro_batch}
            break
    row.update(name=name, micro_batch_asked=asked, seconds=time.perf_counter() - t0)
    try:
        row.update(plan_for(a, world))
        if row.get("peak_mem_source") == "cuda_max_allocated":      # a CPU's RSS is not what dbot-plan models
            row["plan_error"] = (row["plan_gib"] - row["peak_process_gib"]) / row["peak_process_gib"]
    except Exception as e:  # noqa: BLE001
        row["plan_error_msg"] = repr(e)
    return row


def sweep(a: argparse.Namespace) -> int:
    from dbot_ds.distributed.groups import init_distributed
    cases = read_cases(a.cases)
    if a.only:
        unknown = sorted(set(a.only) - {n for n, _ in cases})
        if unknown:
            raise SystemExit(f"--only: no case named {unknown} in {a.cases}")
        cases = [(n, c) for n, c in cases if n in a.only]
    rank, world, device = init_distributed()
    start, out = time.perf_counter(), Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, (name, case) in enumerate(cases):
        elapsed = time.perf_counter() - start
        if i and a.deadline_s and elapsed > a.deadline_s:       # the first case always runs
            print(f"[sweep] deadline: {elapsed:.1f} s > {a.deadline_s:g} s; not run: "
                  f"{', '.join(n for n, _ in cases[i:])}", flush=True)
            break
        print(f"[sweep] {name} ({i + 1}/{len(cases)}, {elapsed:.0f} s in)", flush=True)
        row = run_case(name, case, world, device, a.min_micro_batch)
        if rank == 0:
            print(row.get("error") or bench_step.summary(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if rank == 0:
        print(table(load_rows(out)))
    return 0


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    """One markdown table of a sweep's rows (errors shown as such)."""
    head = ("| case | arch | ZeRO | teacher | teacher depth | micro-batch | ckpt | compile | img/s/GPU | TFLOP/s | MFU | "
            "baseline img/s | speedup | step ms (teacher / student / optim) | peak alloc GiB | process GiB | "
            "dbot-plan GiB | plan error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:120]} |")
            continue
        s = r["split_s"]
        mb = str(r["micro_batch"]) + ("" if r["micro_batch"] == r.get("micro_batch_asked", r["micro_batch"])
                                      else f" (asked {r['micro_batch_asked']})")
        extra = " ".join(r.get("overrides") or [])
        base = r.get("baseline_img_per_s_per_gpu") or ("OOM" if "baseline_error" in r else None)
        lines.append(
            f"| {r['name']}{' ' + extra if extra else ''} | {r['arch']} | {r['zero']} | {r['teacher']} | {r['teacher_depth']} | "
            f"{mb} | {r['act_ckpt_every']} | {'yes' if r['compile'] else 'no'} | {r['img_per_s_per_gpu']:.0f} | "
            f"{r['tflops_per_gpu']:.0f} | {100 * r['mfu']:.1f}% | {base if isinstance(base, str) else _f(base, '.0f')} | "
            f"{_f(r.get('speedup'), '.2f')} | {1e3 * r['step_s']:.0f} ({1e3 * s['teacher_forward']:.0f} / "
            f"{1e3 * s['student_forward_backward']:.0f} / {1e3 * s['optimizer']:.0f}) | {r['peak_mem_gib']:.1f} | "
            f"{r['peak_process_gib']:.1f} | {_f(r.get('plan_gib'), '.1f')} | "
            f"{'' if r.get('plan_error') is None else format(100 * r['plan_error'], '+.0f') + '%'} |")
    devices = sorted({r["device"] for r in rows if "device" in r})
    return f"device: {', '.join(devices) or 'none'}; {len(rows)} cases\n\n" + "\n".join(lines)


def _table_cmd(a: argparse.Namespace) -> int:
    print(table(load_rows(a.jsonl)))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("sweep", help="many `step` cases in one process (a GPU session's table)")
    p.add_argument("cases", help="file of 'NAME: dbot-bench step args' lines, e.g. launch/gpu_cases.txt")
    p.add_argument("--out", required=True, help="JSONL to append one row per case to")
    p.add_argument("--deadline-s", type=float, default=0.0, help="start no case after this many seconds, bar the first (0: no limit)")
    p.add_argument("--min-micro-batch", type=int, default=16, help="lowest micro-batch an OOM retry may use")
    p.add_argument("--only", nargs="+", help="run only these case names")
    p.set_defaults(func=sweep)
    p = commands.add_parser("table", help="markdown table of a `sweep` JSONL")
    p.add_argument("jsonl")
    p.set_defaults(func=_table_cmd)

