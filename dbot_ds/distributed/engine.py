"""The student's DeepSpeed engine: the DeepSpeed config written from the project config, AdamW, and the
stage-end edits (re-initialise the student, optionally reset AdamW) done through DeepSpeed's safe_* APIs.

Why both writes at a re-init (see shared REFERENCE, DeepSpeed 0.19.8): `safe_set_full_fp32_param` only sets
the optimizer's fp32 master copy; the bf16 weights the next forward reads stay old until the next step copies
master -> bf16. So the bf16 weights are written too: under ZeRO-0/1/2 they are whole on every rank and every
rank writes the same values; under ZeRO-3 rank 0 writes inside `GatheredParameters(..., modifier_rank=0)`,
which broadcasts and re-partitions on exit.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_full_optimizer_state

from dbot_ds.config import Config, ConfigError, grad_accum_steps, zero_name
from dbot_ds.model.vit import param_groups

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# Keys the project config owns; a DeepSpeed JSON that sets them would be a second source of truth.
PROJECT_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler", "communication_data_type")


def resolve_ds_json(name_or_path: str) -> Path:
    """The DeepSpeed JSON to use. Empty: the one `accelerate launch` was given (ACCELERATE_DEEPSPEED_CONFIG_FILE),
    else zero2. A value that disagrees with accelerate's file is an error, so the ZeRO stage has one source."""
    from_accelerate = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    name_or_path = zero_name(name_or_path) if name_or_path else name_or_path
    path = Path(name_or_path or from_accelerate or "zero2")
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{path}.json"
    if name_or_path and from_accelerate and path.resolve() != Path(from_accelerate).resolve():
        raise ConfigError(f"deepspeed.config={name_or_path} ({path}) differs from the deepspeed_config_file of the "
                          f"accelerate config ({from_accelerate}); drop deepspeed.config or make them agree")
    return path


def load_ds_json(name_or_path: str) -> dict:
    """A shipped config by name (zero2, zero3, zero3_offload) or a JSON file path (see resolve_ds_json)."""
    path = resolve_ds_json(name_or_path)
    if not path.exists():
        shipped = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"deepspeed.config '{name_or_path}' not found; use one of {shipped} or a JSON path")
    ds = json.loads(path.read_text())
    owned = [k for k in PROJECT_OWNED if k in ds]
    if owned:
        raise ConfigError(f"{path} sets {owned}: these come from the project config (optim.global_batch, "
                          "optim.micro_batch, optim.clip_grad, optim.precision, optim.grad_reduce_dtype, optim.*); remove them from the JSON")
    return ds


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config for the student: the JSON's ZeRO settings + batch, clipping and precision from cfg."""
    ds = load_ds_json(cfg.deepspeed.config)
    o = cfg.optim
    if o.precision not in ("bf16", "fp32"):      # "auto" is resolved by the trainer for its device (precision.py)
        raise ValueError(f"optim.precision={o.precision!r} must be resolved to bf16 or fp32 before building an engine")
    ds.update(train_batch_size=o.global_batch, train_micro_batch_size_per_gpu=o.micro_batch,
              gradient_accumulation_steps=grad_accum_steps(cfg, world_size),
              gradient_clipping=o.clip_grad,
              bf16={"enabled": o.precision == "bf16", "check_grad_overflow": o.skip_nonfinite_steps},
              # The dtype DeepSpeed reduces gradients in across data-parallel ranks (ZeRO-1/2: the all-reduce /
              # reduce-scatter of each gradient bucket, which is cast to it and, after the reduction, copied back
              # into the bf16 gradient buffer; ZeRO-3: its reduce-scatter). Unset, DeepSpeed uses the model dtype.
              communication_data_type="fp32" if o.precision == "fp32" else o.grad_reduce_dtype)
    # DeepSpeed's throughput timer is on by default and, with no dataloader passed to initialize (ours),
    # synchronises the device twice per micro-step. Our own metrics time the steps; keep it off unless asked.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_optimizer(model: nn.Module, cfg: Config, ds_config: dict, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the reference's decay groups. Fused torch AdamW on CUDA; DeepSpeed's CPU Adam when the
    optimizer is offloaded (DeepSpeed requires it there)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")


def init_student_engine(student: nn.Module, cfg: Config, world_size: int, device: torch.device,
                        load_universal: bool = False):
    """Wrap the student in a DeepSpeed engine; returns (engine, ds_config). `load_universal`: the engine will
    load a universal checkpoint (another world size or ZeRO stage wrote it, see reshard.py)."""
    ds_config = build_ds_config(cfg, world_size)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    optimizer = build_optimizer(student, cfg, ds_config, device)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=copy.deepcopy(ds_config))
    return engine, ds_config


def destroy_engine(engine) -> None:
    """`engine.destroy()` and what it leaves behind in DeepSpeed 0.19.8's ZeRO-3, which keeps the engine's module,
    its hooks and through them the engine, optimizer and partitions alive as long as the process (one old teacher
    per swap under teacher.placement=zero3; a whole student per ZeRO-3 case in a benchmark sweep):
    - set-up pushes the root module onto the module-level `FWD_MODULE_STACK` (zero/parameter_offload.py) and
      never pops it;
    - `PartitionedParameterCoordinator.__params_to_release` is a class-level, unbounded `functools.lru_cache`
      keyed on (coordinator, submodule). Clearing it only costs live engines a recomputation."""
    module = engine.module               # taken first: destroy() may drop the engine's own reference
    engine.destroy()
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for fn in [cached] + [c.cell_contents for c in getattr(cached, "__closure__", None) or ()]:   # under nvtx's wrapper
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def full_fp32_state(engine, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full fp32 master weights of the student's parameters under `prefix` (e.g. 'encoder.'), on every rank
    and on the CPU. A collective: every rank must call it."""
    out = {}
    for name, p in engine.module.named_parameters():
        if not name.startswith(prefix):
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:      # no optimizer mapping (e.g. ZeRO-0 fp32): the module weight is the master
            full = p.detach()
        out[name[len(prefix):]] = full.detach().float().cpu().clone()
    return out


@torch.no_grad()
def write_student_weights(engine, state: dict[str, torch.Tensor], stage: int, rank: int) -> None:
    """Overwrite every student parameter with `state` (full tensors, identical on all ranks): the fp32 master
    copy and the low-precision weights the next forward uses."""
    params = dict(engine.module.named_parameters())
    if set(params) != set(state):
        raise KeyError(f"re-init state does not match the student: {sorted(set(params) ^ set(state))[:5]}")
    for name, p in params.items():
        safe_set_full_fp32_param(p, state[name].to(torch.float32).to(p.device))
    for name, p in params.items():
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(state[name].to(p.device, p.dtype))
        else:
            p.data.copy_(state[name].to(p.device, p.dtype))


def _link_optimizer_state(engine) -> None:
    """Make DeepSpeed's per-parameter views of the optimizer state cover every param group.

    DeepSpeed 0.19.8 ZeRO-1/2 links them once, right after the first param group's first step, when the later
    groups (here: the no-decay group) have no AdamW state yet; their params then have no 'exp_avg' and
    safe_*_optimizer_state fails. Loading a checkpoint replaces the state tensors too. Re-link before use."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def reset_adam(engine) -> None:
    """Zero AdamW's moments (through DeepSpeed's API) and its step counts, as a freshly built AdamW."""
    _link_optimizer_state(engine)
    for p in engine.module.parameters():
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        zeros = torch.zeros(shape, dtype=torch.float32, device=p.device if p.numel() else "cpu")
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, zeros, key)
    # DeepSpeed has no API for the step count; it lives in the wrapped torch optimizer's per-tensor state.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def adam_moments(engine, names: list[str]) -> dict[str, torch.Tensor]:
    """Full exp_avg of the named student params (a collective), for tests and diagnostics."""
    from deepspeed.utils import safe_get_full_optimizer_state
    _link_optimizer_state(engine)
    params = dict(engine.module.named_parameters())
    return {n: safe_get_full_optimizer_state(params[n], "exp_avg").float().cpu() for n in names}
