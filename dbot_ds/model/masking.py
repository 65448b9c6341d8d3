"""Which patches the student does not see: per-sample random masking (MAE) and BEiT's block-wise masking.

Block-wise masking, as the reference's CLIP-teacher recipe runs it (dBOT `beit` branch, `masking_generator.py`,
itself BEiT v1's): on a `grid_h x grid_w` patch grid, repeatedly hide one random rectangle until `num_masked`
patches are hidden. Each rectangle has an area drawn uniformly from [min_block, remaining] (remaining = patches
still to hide, capped by `max_block`) and a log-uniform aspect ratio in [min_aspect, 1 / min_aspect]; it must be
strictly smaller than the grid on both sides and may overlap earlier ones, but may add at most `remaining` new
patches. Ten failed draws in a row end the image early, so an image can end with FEWER than `num_masked` hidden
patches (on a 14 x 14 grid with 78 requested, about 30% of images end with 69-77; the mean is about 77.5). BEiT
v2's generator tops up or trims to the exact count; the dBOT reference does not, and neither does this one.

Random numbers come from a `random.Random` seeded from torch's global CPU generator, so a run that seeds torch
before each forward (the trainer does) gets the same masks again; the pure-Python loop costs about 80 us an image.
"""
from __future__ import annotations

import math
import random

import torch

MIN_ASPECT = 0.3          # reference default; the max aspect is its inverse


def block_mask_2d(rng: random.Random, grid_h: int, grid_w: int, num_masked: int, min_block: int = 16,
                  max_block: int | None = None, min_aspect: float = MIN_ASPECT) -> list[list[bool]]:
    """One image's mask as rows of bools (True = hidden); at most `num_masked` are True (see the module doc)."""
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = [[False] * grid_w for _ in range(grid_h)]
    hidden = 0
    while hidden < num_masked:
        budget = min(num_masked - hidden, max_block)
        added = _add_block(rng, mask, grid_h, grid_w, min_block, budget, log_aspect)
        if added == 0:
            break                      # ten draws found no block that fits the budget: stop short, as the reference
        hidden += added
    return mask


def _add_block(rng: random.Random, mask: list[list[bool]], grid_h: int, grid_w: int, min_block: int, budget: int,
               log_aspect: tuple[float, float]) -> int:
    """Hide one rectangle that adds between 1 and `budget` new patches; up to ten draws. Returns patches added."""
    for _ in range(10):
        area = rng.uniform(min_block, budget)          # budget < min_block is allowed: uniform() then runs downwards
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w >= grid_w or h >= grid_h:
            continue
        top = rng.randint(0, grid_h - h)
        left = rng.randint(0, grid_w - w)
        new = sum(not mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
        if 0 < new <= budget:
            for i in range(top, top + h):
                for j in range(left, left + w):
                    mask[i][j] = True
            return new
    return 0


def block_masking(batch: int, grid: int, num_masked: int, min_block: int = 16, device: torch.device | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Block-wise masks for a batch: bool [B, grid*grid], True = hidden, row-major patch order.

    The Python RNG is seeded from torch (`generator`, else the global CPU generator), so seeding torch fixes them.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = random.Random(seed)
    rows = [sum(block_mask_2d(rng, grid, grid, num_masked, min_block), []) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def random_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device | None = None) -> torch.Tensor:
    """Per-sample random masks by argsort of uniform noise: bool [B, N], exactly N - int(N (1 - ratio)) hidden."""
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, device=device)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)       # rank of each patch's noise; small = kept
    return rank >= keep
