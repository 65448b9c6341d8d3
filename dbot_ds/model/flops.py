"""Model FLOPs of a dBOT step, from the architecture (matmuls only; FLOP = 2 MAC; backward = 2 x forward).

Per transformer block over N tokens of width d with MLP ratio r, the forward costs
N (4 d^2 + 2 r d^2) MACs in its linear layers (12 N d^2 for r = 4) plus 2 N^2 d in attention (QK^T and AV).
The student embeds all N patches, runs its encoder on the K + 1 visible tokens and its decoder on all N + 1;
the teacher runs on all N + 1 tokens. Activation recompute adds one student forward to the hardware FLOPs but
not to the model FLOPs that MFU counts.
"""
from __future__ import annotations

from dbot_ds.config import ModelConfig

# Dense bf16 peak per GPU, TFLOP/s (vendor figures). MFU = achieved model FLOP/s / peak.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0, "L40S": 362.0, "A10G": 125.0,
               "RTX3090": 71.0, "RTX4090": 165.0, "V100": 125.0}


def block_macs(tokens: int, width: int, mlp_ratio: float) -> float:
    """Forward MACs of one pre-norm ViT block over `tokens` tokens."""
    return tokens * (4 + 2 * mlp_ratio) * width**2 + 2 * tokens**2 * width


def _grid(cfg: ModelConfig) -> int:
    return (cfg.img_size // cfg.patch_size) ** 2


def patch_embed_macs(cfg: ModelConfig) -> float:
    return _grid(cfg) * 3 * cfg.patch_size**2 * cfg.embed_dim


def visible_tokens(cfg: ModelConfig) -> int:
    """Tokens the student encoder sees: cls + int(N (1 - mask_ratio))."""
    return 1 + int(_grid(cfg) * (1 - cfg.mask_ratio))


def teacher_forward_flops(cfg: ModelConfig, depth: int) -> float:
    """FLOPs per image of a depth-`depth` teacher over all tokens (depth 0: the patch embedding only)."""
    n = _grid(cfg) + 1
    return 2 * (patch_embed_macs(cfg) + depth * block_macs(n, cfg.embed_dim, cfg.mlp_ratio))


def student_forward_flops(cfg: ModelConfig, teacher_dim: int | None = None) -> float:
    """FLOPs per image of the student's forward: patch embedding, encoder on visible tokens, decoder, predictor."""
    n, k, dd = _grid(cfg) + 1, visible_tokens(cfg), cfg.decoder_embed_dim
    macs = (patch_embed_macs(cfg) + cfg.depth * block_macs(k, cfg.embed_dim, cfg.mlp_ratio)
            + k * cfg.embed_dim * dd + cfg.decoder_depth * block_macs(n, dd, cfg.mlp_ratio)
            + n * dd * (teacher_dim or cfg.embed_dim))
    return 2 * macs


def step_flops_per_image(cfg: ModelConfig, teacher_depth: int, recompute: bool = False) -> dict[str, float]:
    """{'teacher', 'student', 'model', 'hardware'} FLOPs per image of one training step.
    model = teacher forward + 3 x student forward; hardware adds the recomputed student forward."""
    teacher = teacher_forward_flops(cfg, teacher_depth)
    student = 3 * student_forward_flops(cfg)
    model = teacher + student
    extra = student_forward_flops(cfg) if recompute and cfg.act_ckpt_every else 0.0
    return {"teacher": teacher, "student": student, "model": model, "hardware": model + extra}


def mfu(img_per_s_per_gpu: float, flops_per_image: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per GPU over the GPU's peak."""
    return img_per_s_per_gpu * flops_per_image / (peak_tflops * 1e12)
