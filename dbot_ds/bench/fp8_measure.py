"""`dbot-bench fp8`'s three measurements: (a) target parity of the bf16/fp8/fp32 teachers, (b) teacher forward
speed, (c) loss curves of plain training steps with each teacher's targets, and their comparison."""
from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from dbot_ds.data.augment import normalize
from dbot_ds.model.objective import SMOOTH_L1_BETA, dbot_loss, standardize_tokens
from dbot_ds.model.vit import param_groups

from .step import _sync

# ----------------------------------------------------------------------------------------------------------
# a. parity


def _stats(cos: torch.Tensor) -> dict:
    """Per-token cosines [T] -> mean, min, 0.1% quantile."""
    cos = cos.double()
    return {"mean": cos.mean().item(), "min": cos.min().item(), "q001": torch.quantile(cos, 0.001).item()}


@torch.no_grad()
def target_parity(models: dict[str, torch.nn.Module], images: torch.Tensor, batch: int, device: torch.device) -> dict:
    """Targets of each teacher (`bf16`, `fp8`, `fp32`) on uint8 images [B, 3, H, W], compared per token: cosine
    statistics raw and standardised, max abs differences, relative L2 error ||a - b|| / ||b|| over all tokens."""
    pairs = (("fp8", "bf16"), ("bf16", "fp32"), ("fp8", "fp32"))
    raw = {p: [] for p in pairs}
    std = {p: [] for p in pairs}
    max_abs = {p: 0.0 for p in pairs}
    max_abs_std = {p: 0.0 for p in pairs}
    sq_diff = {p: 0.0 for p in pairs}
    sq_ref = {p: 0.0 for p in pairs}
    target_absmax, sl1_sum, tokens = 0.0, 0.0, 0
    for i in range(0, len(images), batch):
        x = normalize(images[i:i + batch].to(device))
        out = {k: m(x.to(next(m.parameters()).dtype)).float() for k, m in models.items()}   # its weights' dtype
        out_std = {k: standardize_tokens(v) for k, v in out.items()}
        for a, b in pairs:
            raw[(a, b)].append(F.cosine_similarity(out[a], out[b], dim=-1).flatten().cpu())
            std[(a, b)].append(F.cosine_similarity(out_std[a], out_std[b], dim=-1).flatten().cpu())
            max_abs[(a, b)] = max(max_abs[(a, b)], (out[a] - out[b]).abs().max().item())
            max_abs_std[(a, b)] = max(max_abs_std[(a, b)], (out_std[a] - out_std[b]).abs().max().item())
            sq_diff[(a, b)] += (out[a] - out[b]).double().square().sum().item()
            sq_ref[(a, b)] += out[b].double().square().sum().item()
        target_absmax = max(target_absmax, out["bf16"].abs().max().item())
        # the loss the fp8 targets alone would score against the bf16 ones (every token in the loss)
        sl1 = F.smooth_l1_loss(out_std["fp8"], out_std["bf16"], reduction="none", beta=SMOOTH_L1_BETA).mean(-1)
        sl1_sum += sl1.sum().item()
        tokens += sl1.numel()
    res = {"images": len(images), "tokens": tokens, "target_absmax_bf16": target_absmax,
           "smooth_l1_fp8_vs_bf16": sl1_sum / tokens}
    for a, b in pairs:
        key = f"{a}_vs_{b}"
        res[key] = {"cos_raw": _stats(torch.cat(raw[(a, b)])), "cos_std": _stats(torch.cat(std[(a, b)])),
                    "max_abs_diff_raw": max_abs[(a, b)], "max_abs_diff_std": max_abs_std[(a, b)],
                    "rel_l2_raw": math.sqrt(sq_diff[(a, b)] / sq_ref[(a, b)])}
    return res


# ----------------------------------------------------------------------------------------------------------
# b. speed


@torch.no_grad()
def time_forward(model: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int, device: torch.device) -> dict:
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        t0 = _sync(device)
        model(x)
        times.append(_sync(device) - t0)
    med = statistics.median(times)
    return {"median_s": med, "img_per_s": x.shape[0] / med}


# ----------------------------------------------------------------------------------------------------------
# c. loss curves


def train_curve(student: torch.nn.Module, init: dict[str, torch.Tensor], teacher: torch.nn.Module,
                teacher_dtype: torch.dtype, pool: torch.Tensor, a: argparse.Namespace, batch: int,
                device: torch.device, cfg) -> tuple[list[float], float]:
    """(per-step losses, median step seconds) of `a.steps` steps from `init`; batch indices and masks depend only on
    (seed, step). Each step ends with a device sync (for its time), which a real run would not do."""
    student.load_state_dict(init)
    student.train()
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(student, o.weight_decay), lr=a.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    losses, times = [], []
    for step in range(a.steps):
        t0 = _sync(device)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / max(1, a.lr_warmup))
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        x = normalize(pool[torch.randint(len(pool), (batch,), generator=gen)].to(device))
        with torch.no_grad():
            target = teacher(x.to(teacher_dtype))
        torch.manual_seed(a.seed * 1_000_003 + step)           # the student's random mask (torch.rand on device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred, mask = student(x)
            loss = dbot_loss(pred, target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        times.append(_sync(device) - t0)
    return torch.stack(losses).float().cpu().tolist(), statistics.median(times)


def _smooth(v: list[float], window: int) -> np.ndarray:
    window = max(1, min(window, len(v)))
    return np.convolve(np.asarray(v, np.float64), np.ones(window) / window, mode="valid")


def compare_curves(test: list[float], ref: list[float], window: int) -> dict:
    """Differences of `test` to `ref`, raw and smoothed (trailing moving average over `window` steps)."""
    t, r = np.asarray(test), np.asarray(ref)
    ts, rs = _smooth(test, window), _smooth(ref, window)
    w = max(1, min(window, len(test)))
    return {"max_abs_diff": float(np.abs(t - r).max()), "max_rel_diff": float((np.abs(t - r) / np.abs(r)).max()),
            "max_abs_diff_smoothed": float(np.abs(ts - rs).max()),
            "max_rel_diff_smoothed": float((np.abs(ts - rs) / np.abs(rs)).max()),
            "first_step_diff": float(t[0] - r[0]), "final": float(t[-w:].mean()), "final_ref": float(r[-w:].mean()),
            "final_rel_diff": float(abs(t[-w:].mean() - r[-w:].mean()) / abs(r[-w:].mean()))}
