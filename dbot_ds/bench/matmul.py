"""`dbot-bench matmul`: does this CPU run bf16 matmuls natively? fp32 against bf16 GFLOP/s of one matmul shape.

What `optim.precision=auto` decides on a CPU (dbot_ds/train/precision.py), measured instead of inferred from CPU
flags: where bf16 is emulated (AVX2 only, or oneDNN capped by ONEDNN_MAX_CPU_ISA) it runs tens of times slower
than fp32. The default shape is the demo's widest matmul with a 2048-token batch."""
from __future__ import annotations

import json
import time

import torch

from dbot_ds.train.precision import cpu_bf16


def gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of [m, k] @ [k, n] in `dtype`, repeated for about `seconds` after 3 warm-up calls."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9


def main(args) -> int:
    m, k, n = args.shape
    fp32 = gflops(m, k, n, torch.float32, args.seconds)
    bf16 = gflops(m, k, n, torch.bfloat16, args.seconds)
    native, what = cpu_bf16()
    print(json.dumps({"shape": [m, k, n], "threads": torch.get_num_threads(),
                      "capability": torch.backends.cpu.get_cpu_capability(), "fp32_gflops": round(fp32, 1),
                      "bf16_gflops": round(bf16, 1), "bf16_over_fp32": round(bf16 / fp32, 3),
                      "auto_sees_native_bf16": native, "why": what}))
    return 0


def add_command(commands) -> None:
    p = commands.add_parser("matmul", help="fp32 vs bf16 matmul GFLOP/s on this CPU (what optim.precision=auto decides)")
    p.add_argument("--shape", type=int, nargs=3, default=[2048, 384, 384], metavar=("M", "K", "N"))
    p.add_argument("--seconds", type=float, default=2.0, help="time per dtype")
    p.set_defaults(func=main)
