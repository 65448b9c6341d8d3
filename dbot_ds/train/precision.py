"""Which precision a run trains in: `optim.precision` = auto | bf16 | fp32.

Why `auto` (the default): bf16 halves memory and doubles matmul speed on a GPU, but on a CPU without native
bf16 instructions (AVX2 only, or AVX-512 without AVX512-BF16 / AMX) PyTorch emulates every bf16 matmul, and a
step runs about 20x slower than in fp32 (a 2048x384 @ 384x384 matmul: 1.3 GFLOP/s bf16 vs 44.9 fp32 on a 2-core
AVX2 EPYC, as reported in issue 25; 2.2 vs 115 with oneDNN capped at AVX2, docs/cpu.md). So `auto` is bf16 on a GPU that supports it and on a CPU with native bf16, fp32
elsewhere. An explicit bf16 on an emulating CPU still runs, with one warning.

The choice is made once, at the start of a run, and written into the run's config (and so into every
checkpoint) as the concrete value. A resumed run with `auto` continues in its checkpoint's precision (the one
its optimizer state was trained in), saying so if this machine would have chosen the other one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

PRECISIONS = ("auto", "bf16", "fp32")
CPU_BF16_ENV = "DBOT_CPU_BF16"     # "0" / "1": override the CPU's detected bf16 support (reproduces another machine)


class Choice(NamedTuple):
    precision: str                 # "bf16" or "fp32": what the run trains in
    reason: str                    # why, for the start line
    warning: str | None = None     # a slowdown the user asked for explicitly


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 matmuls?, what the CPU offers), from torch's CPU feature probes, else /proc/cpuinfo."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if limit and limit not in ("ALL", "DEFAULT") and not any(k in limit for k in ("BF16", "AMX", "FP16")):
        # oneDNN runs torch's CPU matmuls: capped below its bf16 kernels, it emulates bf16 (measured 2.2 vs 115
        # GFLOP/s fp32 under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX512-BF16 EPYC)
        return False, f"ONEDNN_MAX_CPU_ISA={limit} keeps oneDNN below its bf16 kernels"
    try:
        avx512_bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
    except AttributeError:                   # older torch: read the kernel's flags
        flags = _cpuinfo_flags()
        avx512_bf16, amx = "avx512_bf16" in flags, "amx_bf16" in flags
    if amx or avx512_bf16:
        return True, "AMX" if amx else "AVX512-BF16"
    return False, f"{torch.backends.cpu.get_cpu_capability()} without AVX512-BF16 or AMX"


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def emulated_bf16_warning(what: str) -> str:
    return (f"bf16 on a CPU without native bf16 matmuls ({what}): PyTorch emulates them, expect "
            "steps about 20x slower than fp32 (up to 35x for large matmuls). optim.precision=auto or fp32 avoids it")


def choose(requested: str, device: torch.device) -> Choice:
    """Resolve `requested` (auto | bf16 | fp32) for `device`."""
    if requested == "fp32":
        return Choice("fp32", "set by optim.precision")
    if device.type == "cuda":
        if requested == "bf16":
            return Choice("bf16", "set by optim.precision")
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Choice("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16 support")
    native, what = cpu_bf16()
    if requested == "bf16":
        return Choice("bf16", "set by optim.precision", None if native else emulated_bf16_warning(what))
    if native:
        return Choice("bf16", f"auto: this CPU has native bf16 matmuls ({what})")
    return Choice("fp32", f"auto: this CPU has no native bf16 matmuls ({what}); bf16 would run about 20x slower")


def for_resume(requested: str, choice: Choice, saved: str | None, tag: str, device: torch.device) -> Choice:
    """With `auto`, a resumed run keeps the precision its checkpoint `tag` was trained in (`saved`); an explicit
    value that differs is left to the resume check, which refuses it with both values named."""
    if requested != "auto" or saved is None or saved == choice.precision:
        return choice
    warning = None
    if saved == "bf16" and device.type == "cpu" and not cpu_bf16()[0]:
        warning = emulated_bf16_warning(cpu_bf16()[1])
    return Choice(saved, f"auto: checkpoint {tag} was trained in {saved}, so the run continues in it (on its own this "
                         f"machine would choose {choice.precision}: {choice.reason.removeprefix('auto: ')})", warning)


def for_run(requested: str, device: torch.device, meta: dict | None, tag: str | None) -> Choice:
    """The run's choice: `choose`, then (resuming from checkpoint `tag` whose COMPLETE record is `meta`) `for_resume`."""
    choice = choose(requested, device)
    if meta is None:
        return choice
    saved = meta["client_state"]["config"]["optim"].get("precision")
    return for_resume(requested, choice, saved, tag, device)


def dtype(precision: str) -> torch.dtype:
    """The compute dtype of a resolved precision."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision '{precision}' is not resolved; call precision.choose() first")
    return torch.bfloat16 if precision == "bf16" else torch.float32
