"""FP8 (e4m3) forward for the frozen teacher's transformer blocks (Hopper/Ada, or the CPU for tests).

The teacher's forward is about half of a training step's FLOPs and needs no gradients, so its Linear layers can
run on FP8 tensor cores. `to_fp8(teacher)` swaps, in place, the nn.Linear layers inside the transformer blocks
(attention qkv/proj, MLP fc1/fc2) for `Fp8Linear`:

- weight: quantised once to float8_e4m3fn with one fp32 scale per output row (amax / 448), so a row of large
  weights does not cost the other rows their precision;
- activations: quantised per call with one fp32 scale per token (row of the [M, in] input), for the same reason:
  ViT activations have tokens of very different magnitude (cls, high-norm tokens);
- product: `torch._scaled_mm` (fp32 accumulation, both scales and the bias applied in the epilogue), bf16 out.

It is an option to be measured before use (`dbot-bench fp8`: target parity on real images, speed, a loss
curve); nothing in training calls it by default. Layers outside the blocks (patch embedding, norms, and any Linear
whose dims are not multiples of 16, which `_scaled_mm` needs on CUDA) stay in bf16.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from timm.models import beit
from timm.models.vision_transformer import Block as vit_block
from torch import nn

E4M3_MAX = 448.0            # largest finite float8_e4m3fn value
MIN_SCALE = 1e-12           # scale floor: an all-zero (or denormal) row quantises to zeros instead of NaN
ALIGN = 16                  # _scaled_mm on CUDA: inner (in) and outer (out) dims must be multiples of 16
MIN_CAPABILITY = (8, 9)     # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later

# Containers whose Linear layers are converted: our encoders' timm `Block`, the symmetric student's timm BEiT
# `Block`, and transformers' CLIP encoder layer (the hf_clip teacher; matched by class name so that importing
# this module does not import transformers).
_BLOCK_TYPES = (vit_block, beit.Block)
_BLOCK_CLASS_NAMES = ("CLIPEncoderLayer",)


class Fp8Error(RuntimeError):
    """FP8 cannot be used here (device or model); the message says why and what to do instead."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantisation: x [M, K] (any float dtype) -> (x8 [M, K] float8_e4m3fn, scale [M, 1] fp32)
    with x ~= x8 * scale. Each row's amax maps to 448; the clamp only guards against rounding past 448."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp(min=MIN_SCALE)
    x8 = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, scale


_compiled_quantize = None
fused_quant_error: str | None = None     # why the compiled quantisation is not used (then: eager), None while it is


def _fused_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` compiled (CUDA): a fused kernel that reads the bf16 rows once and writes the fp8 rows and
    their scales. Eager, the same is ~6 kernels (abs, amax, float, divide, clamp, cast), each a pass over the
    activation: memory traffic of the order of what FP8 saves in the matmul. Static shapes: a row length known at
    compile time gives a one-pass (persistent) row reduction; a model has two row lengths (width, MLP hidden) and a
    run one or two token counts, well under dynamo's recompile limit. If compiling fails (no Triton, no compiler),
    it warns once and stays eager: slower, same numbers."""
    global _compiled_quantize, fused_quant_error
    if fused_quant_error is None:
        try:
            if _compiled_quantize is None:
                _compiled_quantize = torch.compile(quantize_rows, dynamic=False)
            return _compiled_quantize(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:              # inductor/triton missing or broken: correctness does not depend on it
            fused_quant_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"dbot_ds.model.fp8: compiling the activation quantisation failed ({fused_quant_error}); "
                          "using the eager version (slower)")
    return quantize_rows(x)


class Fp8Linear(nn.Module):
    """A frozen Linear y = x W^T + b with W in float8_e4m3fn (per-output-row scales) and per-token activation scales.

    Buffers (no parameters, no grads): `weight_fp8` [out, in] float8_e4m3fn, `weight_scale` [1, out] fp32 (the layout
    `_scaled_mm`'s row-wise `scale_b` takes), `bias` [out] bf16 or None. A module-wide `.to(dtype)` / `.half()` does
    not change them (see `_apply`): FP8 storage is the point, and a bf16 scale would lose precision.
    """

    def __init__(self, in_features: int, out_features: int, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, fuse_quant: bool = True, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fuse_quant = fuse_quant       # compiled activation quantisation on CUDA
        self.fast_accum = fast_accum       # _scaled_mm use_fast_accum: faster on Hopper, less exact accumulation
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fuse_quant: bool = True, fast_accum: bool = False) -> "Fp8Linear":
        """Quantise `linear` (weight [out, in], any float dtype/device) once; the result lives on its device."""
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        amax = w.abs().amax(dim=1, keepdim=True)                           # [out, 1]
        # A zero row would give scale 0 and 0/0 = NaN: give it scale 1 (its fp8 row is zeros either way).
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        w8 = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone()
        return cls(in_f, out_f, w8, scale.t().contiguous(), bias, fuse_quant=fuse_quant, fast_accum=fast_accum)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] fp32: the weight this layer actually multiplies by (for checks)."""
        return self.weight_fp8.float() * self.weight_scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (bf16; any float works) -> [..., out] bf16."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                               # [M, in], M = all tokens
        if self.fuse_quant and x2.is_cuda and not torch.compiler.is_compiling():
            x8, sx = _fused_quantize(x2)     # (inside a compiled block, inductor fuses quantize_rows itself)
        else:
            x8, sx = quantize_rows(x2)
        # weight_fp8.t() is a column-major [in, out] view, the layout _scaled_mm needs for its second operand.
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer, fp8 included: keep each buffer's own dtype and take only the
        # device change (the original values, so an fp32 scale never round-trips through bf16).
        before = {k: b for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3 row-wise{', fast_accum' if self.fast_accum else ''}")


def supported(device: torch.device | str) -> bool:
    """Whether `Fp8Linear` can run on `device`: the CPU (torch's reference _scaled_mm, for tests; not fast) or a
    CUDA GPU of compute capability >= 8.9 (Ada, Hopper: FP8 tensor cores)."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY
    return False


def check_supported(device: torch.device | str) -> None:
    """Raise Fp8Error, naming the problem and the fix, unless `supported(device)`."""
    device = torch.device(device)
    if supported(device):
        return
    if device.type == "cuda" and torch.cuda.is_available():
        cap = tuple(torch.cuda.get_device_capability(device))
        raise Fp8Error(f"FP8 needs a GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, "
                       f"Hopper: FP8 tensor cores); {torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}. Run the "
                       "teacher in bf16 here (do not convert it with to_fp8).")
    raise Fp8Error(f"FP8 is not available on device '{device}' with torch {torch.__version__} (needs "
                   "torch.float8_e4m3fn and torch._scaled_mm on the CPU or a CUDA GPU of capability >= 8.9). Run the "
                   "teacher in bf16 (do not convert it with to_fp8).")


def _convertible(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _is_block(m: nn.Module) -> bool:
    return isinstance(m, _BLOCK_TYPES) or type(m).__name__ in _BLOCK_CLASS_NAMES


def _reads_qkv_weight(parent: nn.Module, name: str) -> bool:
    """timm's BEiT attention with q/v biases runs F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias)) unless
    `qkv_bias_separate` is set, i.e. it reads the weight itself instead of calling the layer."""
    return (name == "qkv" and isinstance(parent, beit.Attention) and parent.q_bias is not None
            and not parent.qkv_bias_separate)


@torch.no_grad()
def to_fp8(module: nn.Module, device: torch.device | str | None = None, fuse_quant: bool = True,
           fast_accum: bool = False, layers: Iterable[str] | None = None) -> int:
    """Replace, in place, the nn.Linear layers inside `module`'s transformer blocks by `Fp8Linear`; return how many.

    Converted: every nn.Linear under a block (timm `Block`, BEiT `Block`, CLIP encoder layer) whose in and out
    dims are multiples of 16 (BEiT's qkv too: its attention is switched to add the q/v bias after the layer).
    Not converted: everything outside the blocks (patch embedding, cls token, norms, a student's decoder_embed /
    predictor) and misaligned layers, which stay as they are. Call it on a frozen, eval-mode module (the teacher)
    already in its compute dtype; `device` (default: where the module's weights are) is checked for FP8 support
    first. Biases become bf16 and outputs are bf16 whatever the module's dtype. `layers` (e.g. ("fc1", "fc2"))
    limits the conversion to Linear layers of those attribute names, to trade speed for accuracy.

    Raises Fp8Error on a device without FP8 (a CUDA GPU below capability 8.9) and when nothing was converted.
    """
    device = torch.device(device) if device is not None else _module_device(module)
    check_supported(device)
    wanted = None if layers is None else set(layers)
    count, skipped = 0, []
    for block in [m for m in module.modules() if _is_block(m)]:
        for parent_name, parent in list(block.named_modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear or (wanted is not None and name not in wanted):
                    continue
                where = f"{parent_name}.{name}" if parent_name else name
                if not _convertible(child):
                    skipped.append(f"{where} ({child.in_features}->{child.out_features})")
                    continue
                if _reads_qkv_weight(parent, name):
                    # Same result, computed as qkv(x) + cat(q_bias, k_bias, v_bias): timm's own switch for this.
                    parent.qkv_bias_separate = True
                setattr(parent, name, Fp8Linear.from_linear(child, fuse_quant=fuse_quant, fast_accum=fast_accum))
                count += 1
    if count == 0:
        found = "no transformer blocks found" if not any(_is_block(m) for m in module.modules()) else (
            f"every Linear in the blocks was left out: {', '.join(sorted(set(skipped))[:4])}")
        raise Fp8Error(f"to_fp8 converted no layer of {type(module).__name__} ({found}). FP8 needs nn.Linear layers "
                       f"inside timm/BEiT/CLIP blocks with in and out dims that are multiples of {ALIGN} (e.g. "
                       "embed_dim and mlp hidden width); run this model's teacher in bf16.")
    return count
