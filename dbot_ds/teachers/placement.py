"""The frozen teacher in inference-only memory: compute dtype, eval mode, no grads, no optimizer state, outside
the student's engine.

Placements:
- `replicated`: a plain module on every rank (ZeRO-1/2 refuse an engine without an optimizer, and a plain
  module has no engine overhead).
- `zero3`: an optimizer-less DeepSpeed ZeRO-3 engine: each rank keeps 1/world of the weights (optionally in
  CPU memory) and gathers a block's weights just before it runs.

Precision (`teacher.precision`, with optim.precision=bf16): `bf16` keeps bf16 weights and runs in bf16; `fp32` keeps
fp32 weights and runs under bf16 autocast (bf16 matmuls; LayerNorm, softmax and the residual stream in fp32), as
the reference runs its fp32 teacher under fp16 autocast. Weights written at a swap are cast once to the weight
dtype, so the teacher is an exact copy of the student's encoder in that dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dbot_ds.config import Config
from dbot_ds.model.vit import build_teacher


class Teacher:
    """Holds the teacher module (or engine) of the current stage and rebuilds it at a swap."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        """`dtype`: the run's compute dtype (optim.precision), which the images arrive in."""
        self.cfg, self.device, self.dtype = cfg, device, dtype
        fp32 = cfg.teacher.precision == "fp32" or dtype == torch.float32
        self.weight_dtype = torch.float32 if fp32 else torch.bfloat16
        self.autocast = fp32 and dtype == torch.bfloat16   # fp32 weights, bf16 matmuls
        self.placement = cfg.teacher.placement
        self.depth = -1
        self.module: nn.Module | None = None
        self.engine = None

    # -- building and loading ------------------------------------------------------------------------------
    def rebuild(self, depth: int, state: dict[str, torch.Tensor]) -> None:
        """Replace the teacher by a `depth`-block encoder holding `state` (full tensors, same on every rank)."""
        self.release()
        module = build_teacher(self.cfg.model, depth, self.cfg.teacher.final_norm)
        missing = set(module.state_dict()) - set(state)
        if missing:
            raise KeyError(f"teacher weights lack {sorted(missing)[:5]}")
        if self.placement == "replicated":
            module = module.to(self.weight_dtype)
            module.load_state_dict({k: state[k] for k in module.state_dict()})   # copy_ casts once to weight dtype
            self.module = module.to(self.device)
        else:
            self._init_zero3(module.to(self.weight_dtype))
            self._load_zero3(state)
        self.depth = depth

    def adopt(self, module: nn.Module, depth: int = -1) -> None:
        """Use a ready frozen module (a teacher from other weights) under this placement."""
        self.release()
        module = module.requires_grad_(False).eval()
        if self.placement == "replicated":
            self.module = module.to(self.device, self.weight_dtype)
        else:
            self._init_zero3(module.to(self.weight_dtype))
        self.depth = depth

    def _init_zero3(self, module: nn.Module) -> None:
        import deepspeed
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
        if self.cfg.teacher.offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        config = {"train_micro_batch_size_per_gpu": self.cfg.optim.micro_batch, "zero_optimization": zero,
                  "bf16": {"enabled": self.weight_dtype == torch.bfloat16}, "steps_per_print": 10**12}
        self.engine, _, _, _ = deepspeed.initialize(model=module, config=config)
        self.engine.eval()
        self.module = self.engine.module

    @torch.no_grad()
    def _load_zero3(self, state: dict[str, torch.Tensor]) -> None:
        import deepspeed
        rank = dist.get_rank()
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(state[name].to(p.device, p.dtype))

    def release(self) -> None:
        if self.engine is not None:
            from dbot_ds.distributed.engine import destroy_engine
            destroy_engine(self.engine)
        self.module, self.engine = None, None

    # -- use -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in the compute dtype -> targets [B, 1 + N, D] (all tokens, no masking), in the
        weight dtype (the loss standardises them in fp32)."""
        run = self.engine or self.module
        if not self.autocast:
            return run(images.to(self.weight_dtype))
        # fp32 input: the patch embedding's conv runs in bf16 under autocast, but adding the fp32 positions
        # starts the residual stream in fp32, and every block's residual add keeps it there.
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return run(images.float())

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Full weights on the CPU, on every rank (a collective under `zero3`: all ranks must call it)."""
        if self.placement == "replicated":
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        import deepspeed
        out = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().cpu().clone()
        return out

    def param_bytes_per_rank(self) -> int:
        """Bytes of teacher weights this rank holds (a partition under `zero3`)."""
        total = 0
        for p in self.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += local.numel() * local.element_size()
        return total
