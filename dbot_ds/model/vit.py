"""dBOT networks built from timm layers: the masked student (encoder + decoder + predictor) and the teacher.

Shapes: B images, N = (img_size / patch_size)^2 patches, K = N * (1 - mask_ratio) visible patches,
D encoder width, Dd decoder width, Dt teacher width. Token 0 is always the cls token.

The student's encoder and the teacher share one module (`Encoder`) and therefore the same parameter names
(`patch_embed.proj.weight`, `cls_token`, `blocks.{i}.*`, `norm.*`): the stage-end swap copies by name.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models import beit
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from dbot_ds.config import ModelConfig

from .masking import block_masking, random_mask

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero row for cls: [1 + grid*grid, dim], tokens in row-major
    order; the first half of the channels encodes the column, the second half the row (the MAE convention)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")   # gw varies along columns, gh along rows

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:        # [grid*grid] -> [grid*grid, dim/2]
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([embed_1d(gw), embed_1d(gh)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    x: [B, N, D] -> (x_visible [B, K, D], mask [B, N] with 1 = hidden, ids_restore [B, N]) where
    K = int(N * (1 - mask_ratio)) and gather(shuffled, ids_restore) puts tokens back in image order.
    """
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    noise = torch.rand(b, n, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)      # small noise = kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_visible = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return x_visible, torch.gather(mask, 1, ids_restore), ids_restore


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float) -> nn.ModuleList:
    rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]   # linear, as timm/MAE
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=r) for r in rates)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, ckpt_every: int, training: bool) -> torch.Tensor:
    """Blocks in order; with ckpt_every = k > 0 every k-th block (0, k, 2k, ...) recomputes in backward."""
    for i, blk in enumerate(blocks):
        if training and ckpt_every and i % ckpt_every == 0 and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)   # preserves RNG state: same drop-path in recompute
        else:
            x = blk(x)
    return x


def init_weights(module: nn.Module) -> None:
    """MAE/JAX-ViT init: xavier-uniform Linear (and patch projection as a Linear), zero biases, unit norms,
    normal(0.02) cls/mask tokens."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
    for name, p in module.named_parameters():
        if name.endswith("cls_token") or name.endswith("mask_token"):
            nn.init.normal_(p, std=0.02)


class Encoder(nn.Module):
    """ViT encoder: patch embedding, cls token, fixed sin-cos positions, `depth` blocks, optional final norm."""

    def __init__(self, cfg: ModelConfig, depth: int, final_norm: bool = True, drop_path: float = 0.0,
                 ckpt_every: int = 0):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, 3, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # A buffer, not a parameter: fixed, never trained, never partitioned by ZeRO-3, rebuilt from config.
        grid = cfg.img_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.embed_dim, grid)[None], persistent=False)
        self.blocks = _blocks(cfg.embed_dim, depth, cfg.num_heads, cfg.mlp_ratio, drop_path)
        self.norm = LayerNorm(cfg.embed_dim) if final_norm else nn.Identity()
        self.ckpt_every = ckpt_every
        self.embed_dim = cfg.embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> patch tokens with positions [B, N, D] (no cls)."""
        if images.shape[-2:] != self.patch_embed.img_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px but the model expects "
                             f"{self.patch_embed.img_size}; set model.img_size to match the data")
        return self.patch_embed(images) + self.pos_embed[:, 1:].to(images.dtype)

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, 1 + L, D] with the cls token (plus its zero position) in front."""
        cls = (self.cls_token + self.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks + final norm over any token sequence [B, L, D]."""
        return self.norm(_run_blocks(self.blocks, x, self.ckpt_every, self.training))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens: images [B, 3, H, W] -> [B, 1 + N, D]."""
        return self.transform(self.with_cls(self.embed(images)))


class Student(nn.Module):
    """Asymmetric (MAE-style) student: the encoder sees cls + K visible patches; the decoder predicts the teacher's features
    for all 1 + N tokens."""

    def __init__(self, cfg: ModelConfig, teacher_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        ck = cfg.act_ckpt_every
        self.encoder = Encoder(cfg, cfg.depth, final_norm=True, drop_path=cfg.drop_path, ckpt_every=ck)
        dd = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        grid = cfg.img_size // cfg.patch_size
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, grid)[None], persistent=False)
        # As in the reference, the decoder's blocks take the student's drop-path schedule too.
        self.decoder_blocks = _blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.drop_path)
        self.decoder_norm = LayerNorm(dd)
        self.predictor = nn.Linear(dd, teacher_dim or cfg.embed_dim)
        init_weights(self)
        if cfg.compile:
            compile_blocks(self)

    def forward_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (latent [B, 1 + K, D], mask [B, N], ids_restore [B, N])."""
        visible, mask, ids_restore = random_masking(self.encoder.embed(images), self.cfg.mask_ratio)
        return self.encoder.transform(self.encoder.with_cls(visible)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + K, D] -> predictions [B, 1 + N, Dt] in image order."""
        x = self.decoder_embed(latent)
        b, n, dd = x.shape[0], ids_restore.shape[1], x.shape[2]
        hidden = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], hidden], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, dd))   # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = _run_blocks(self.decoder_blocks, x, self.cfg.act_ckpt_every, self.training)
        return self.predictor(self.decoder_norm(x))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (pred [B, 1 + N, Dt], loss mask [B, 1 + N], 1 = in the loss; cls counts as masked)."""
        latent, mask, ids_restore = self.forward_encoder(images)
        pred = self.forward_decoder(latent, ids_restore)
        return pred, torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


# ----------------------------------------------------------------------------------------------------------
# The symmetric (BEiT-style) student of the reference's CLIP-teacher recipe (dBOT `beit` branch,
# modeling_pretrain.py with run.sh's flags): no absolute position embedding, one relative position bias shared by
# all blocks, layer scale (init 0.1), q/v biases without a k bias, final norm, then a linear head to the teacher.


def _trunc_normal(t: torch.Tensor, std: float = 0.02) -> None:
    """BEiT's init: normal(0, std) truncated at +-1 std (the reference passes a=-std, b=std)."""
    nn.init.trunc_normal_(t, std=std, a=-std, b=std)


class BeitEncoder(nn.Module):
    """ViT over cls + all N patch tokens with a shared relative position bias. Parameter names are those of timm's
    `Beit` (use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values=layer_scale_init, global_pool='token'):
    `patch_embed.proj.*`, `cls_token`, `rel_pos_bias.relative_position_bias_table`, `blocks.{i}.*`, `norm.*`."""

    def __init__(self, cfg: ModelConfig, drop_path: float = 0.0, ckpt_every: int = 0):
        super().__init__()
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, 3, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.rel_pos_bias = beit.RelativePositionBias((grid, grid), cfg.num_heads)
        rates = torch.linspace(0, drop_path, cfg.depth).tolist()          # as the reference
        ls = cfg.layer_scale_init or None
        self.blocks = nn.ModuleList(
            beit.Block(cfg.embed_dim, cfg.num_heads, qkv_bias=True, mlp_ratio=cfg.mlp_ratio, drop_path=r,
                       init_values=ls, norm_layer=LayerNorm) for r in rates)
        self.norm = LayerNorm(cfg.embed_dim)
        self.ckpt_every, self.embed_dim = ckpt_every, cfg.embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> patch tokens [B, N, D] (no positions: they come from the attention bias)."""
        if images.shape[-2:] != self.patch_embed.img_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px but the model expects "
                             f"{self.patch_embed.img_size}; set model.img_size to match the data")
        return self.patch_embed(images)

    def transform(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, N, D] patch tokens -> [B, 1 + N, D]: cls in front, blocks, final norm."""
        cls = self.cls_token.to(patches.dtype).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)
        bias = self.rel_pos_bias().to(x.dtype)
        for i, blk in enumerate(self.blocks):
            if self.training and self.ckpt_every and i % self.ckpt_every == 0 and torch.is_grad_enabled():
                x = checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=bias)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens, nothing masked: images [B, 3, H, W] -> [B, 1 + N, D]."""
        return self.transform(self.embed(images))


class SymmetricStudent(nn.Module):
    """BEiT-style student: the encoder sees every patch, a learned mask token replacing the hidden ones; a linear
    head maps every output token to the teacher's width. Only hidden patches are in the loss (not cls)."""

    def __init__(self, cfg: ModelConfig, teacher_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = BeitEncoder(cfg, drop_path=cfg.drop_path, ckpt_every=cfg.act_ckpt_every)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.predictor = nn.Linear(cfg.embed_dim, teacher_dim or cfg.embed_dim)
        self.grid = cfg.img_size // cfg.patch_size
        self.reset_parameters()
        if cfg.compile:
            compile_blocks(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's init: truncated normal(0.02) for Linear/conv weights and the cls/mask tokens, zero biases
        (q/v included), unit norms, zero relative position table, layer scales at model.layer_scale_init, and the
        residual-branch outputs (attn.proj, mlp.fc2) of block i divided by sqrt(2 (i + 1))."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _trunc_normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        enc = self.encoder
        _trunc_normal(enc.cls_token)
        _trunc_normal(self.mask_token)
        enc.rel_pos_bias.reset_parameters()
        for i, blk in enumerate(enc.blocks):
            for name in ("q_bias", "k_bias", "v_bias"):
                t = getattr(blk.attn, name)
                if t is not None:
                    t.zero_()
            if isinstance(blk.gamma_1, nn.Parameter):
                blk.gamma_1.fill_(self.cfg.layer_scale_init)
                blk.gamma_2.fill_(self.cfg.layer_scale_init)
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set[str]:
        """As the reference's `no_weight_decay` ({'pos_embed', 'cls_token'}; there is no pos_embed here)."""
        return {"encoder.cls_token"}

    def sample_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """bool [B, N], True = hidden: block-wise (model.num_mask_patches) or random (model.mask_ratio)."""
        if self.cfg.mask == "block":
            return block_masking(batch, self.grid, self.cfg.num_mask_patches, self.cfg.min_mask_patches_per_block,
                                 device=device)
        return random_mask(batch, self.grid * self.grid, self.cfg.mask_ratio, device=device)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] (optional bool mask [B, N]) -> (pred [B, 1 + N, Dt], loss mask [B, 1 + N] with
        1 = in the loss: the hidden patches; cls is 0, as the reference's default recon_cls_token=False)."""
        x = self.encoder.embed(images)
        if mask is None:
            mask = self.sample_mask(x.shape[0], x.device)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        pred = self.predictor(self.encoder.transform(x))
        loss_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1).to(pred.dtype)
        return pred, loss_mask


def build_student(cfg: ModelConfig, teacher_dim: int | None = None, seed: int | None = None) -> nn.Module:
    """A freshly initialised student (`model.student`: asymmetric `Student` or symmetric `SymmetricStudent`) in fp32
    on the CPU; with `seed`, the init does not touch the global RNG."""
    cls = SymmetricStudent if cfg.student == "symmetric" else Student
    if seed is None:
        return cls(cfg, teacher_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg, teacher_dim)


def build_teacher(cfg: ModelConfig, depth: int, final_norm: bool) -> Encoder:
    """A frozen teacher encoder over all tokens (no masking, no drop-path), in eval mode with no grads."""
    teacher = Encoder(cfg, depth, final_norm=final_norm)
    teacher.requires_grad_(False)
    return (compile_blocks(teacher) if cfg.compile else teacher).eval()


def teacher_state_from_student(student_encoder_state: dict[str, torch.Tensor], teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The subset of the student encoder's weights that the teacher holds (its first blocks, optional norm)."""
    missing = [k for k in teacher.state_dict() if k not in student_encoder_state]
    if missing:
        raise KeyError(f"student encoder lacks teacher weights {missing[:5]}")
    return {k: student_encoder_state[k] for k in teacher.state_dict()}


def compile_blocks(module: nn.Module) -> nn.Module:
    """Regional torch.compile: every transformer block compiled in place. All blocks of a stack share shapes,
    so one graph serves them; ZeRO-3's gather hooks and activation checkpointing stay around the blocks."""
    for m in module.modules():
        if isinstance(m, (Block, beit.Block)):
            m.compile()
    return module


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the reference applies decay: none on biases and 1-D params (norms, layer scales), nor on the
    names the model's `no_weight_decay()` lists (the symmetric student: its cls token, as BEiT); the asymmetric
    student's cls/mask tokens are decayed (timm add_weight_decay in the MAE-based reference)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
