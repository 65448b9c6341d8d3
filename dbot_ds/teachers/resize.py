"""Fitting an external teacher's token grid to the student's, shared by the ViT file source (sources.py) and the
CLIP tower source (clip.py): the grid check that names the teacher.input_size that works, the bicubic
interpolation of a position table, and the resize of the student's images to the teacher's input size
(`ResizedInput`). Also `_is_rank0`, with which both sources print their load report once."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.config import ConfigError


def _is_rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def grid_check(kind: str, trained_px: int, patch: int, input_size: int, student_img: int, student_patch: int) -> int:
    """The teacher's grid side; ConfigError (naming the input size that works) unless it equals the student's.
    Every student grid has one: grid x the teacher's patch size (e.g. 196 px for a /14 teacher beside a 14x14
    /16 student, 256 px for a /16 teacher beside a 16x16 /14 student)."""
    grid = student_img // student_patch
    size = input_size or student_img
    if size % patch == 0 and size // patch == grid:
        return grid
    fit = grid * patch
    trained = f"; the teacher was trained at {trained_px} px" if trained_px else ""
    raise ConfigError(
        f"{kind} teacher: /{patch} patches at teacher.input_size={size} px give a "
        f"{size / patch:g}x{size / patch:g} grid, but the student (model.img_size={student_img}, "
        f"/{student_patch} patches) has {grid}x{grid}: the tokens cannot be aligned. Set teacher.input_size={fit} "
        f"(its {grid}x{grid} grid of /{patch} patches{trained}), or change the student's model.img_size / "
        f"model.patch_size")


def resize_pos_table(pos: torch.Tensor, grid: int, where) -> torch.Tensor:
    """A [1, 1 + g*g, D] position table (cls first) for a `grid` x `grid` input: the patch positions interpolated
    bicubically (size=(grid, grid), align_corners=False: the reference's `interpolate_pos_embed` for a teacher
    checkpoint), the cls position kept."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if pos.dim() != 3 or pos.shape[0] != 1 or old * old + 1 != pos.shape[1]:
        raise ConfigError(f"teacher {where}: pos_embed {tuple(pos.shape)} is not a cls token + a square grid")
    if old == grid:
        return pos
    dim = pos.shape[-1]
    patch = pos[:, 1:].float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1].float(), patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1).to(pos.dtype)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, size, size], bicubic with antialiasing (which, like PIL's bicubic that the
    reference resizes its crop with, low-passes when shrinking). In fp32: antialiased bicubic has no bf16 kernel
    on the CPU, and the resize is cheap beside the tower."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).to(x.dtype)


class ResizedInput(nn.Module):
    """A teacher that reads `size` px images, so that a teacher with another patch size sees the student's token
    grid. In training the loader hands it its own view of each crop at `size` (the reference's
    `--second_input_size`) and this passes it through; a caller with the student's view gets that resized."""

    def __init__(self, encoder: nn.Module, size: int):
        super().__init__()
        self.encoder, self.size = encoder, size
        self.embed_dim = encoder.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(resize_images(images, self.size))
