"""CLIP vision towers as teachers (`teacher.source=hf_clip`).

`hf_clip`: a Hugging Face CLIP vision tower saved with `save_pretrained` (loaded from a local folder, safetensors
only); the target is its last hidden state (or `teacher.layer`), whose 1 + N tokens must line up with the
student's grid. `clip_teacher(cfg)` builds it; `external_teacher` (sources.py) calls it for hf_clip.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.config import Config, ConfigError
from dbot_ds.data.augment import IMAGENET_MEAN, IMAGENET_STD

from .resize import _is_rank0, grid_check, resize_images

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ClipTeacher(nn.Module):
    """A transformers CLIP vision tower as teacher: ImageNet-normalised images -> targets [B, 1 + N, out_dim].

    - The input is re-normalised with CLIP's own mean/std (as the reference's `pre_process`), and, with
      `input_size`, resized (bicubic, antialiased) so that a /14 tower sees the same grid as a /16 student.
    - target `hidden`: hidden state `layer` (-1: the last), before `ln_post`, unprojected (width hidden_size).
    - target `post_norm_proj`: every token through `ln_post` and the visual projection (width projection_dim), as
      the reference's `--post_patch_norm True`.
    """

    def __init__(self, model: nn.Module, layer: int = -1, target: str = "hidden", input_size: int = 0):
        super().__init__()
        self.model, self.layer, self.target, self.input_size = model, layer, target, input_size
        self.tower = model.vision_model if hasattr(model, "visual_projection") else model
        c = model.config
        self.out_dim = c.projection_dim if target == "post_norm_proj" else c.hidden_size
        mean_in, std_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean = torch.tensor(getattr(c, "image_mean", CLIP_MEAN))
        std = torch.tensor(getattr(c, "image_std", CLIP_STD))
        # x_clip = (x_in * std_in + mean_in - mean) / std, as one affine map per channel
        self.register_buffer("scale", (std_in / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_in - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        if self.input_size:
            # In training the loader already cut this view from the crop (a no-op here); other callers that
            # pass the student's view get it resized (bicubic commutes with the per-channel affine above).
            x = resize_images(x, self.input_size)
        out = self.tower(pixel_values=x, output_hidden_states=self.layer >= 0)
        if self.target == "post_norm_proj":
            return self.model.visual_projection(self.tower.post_layernorm(out.last_hidden_state))
        return out.last_hidden_state if self.layer < 0 else out.hidden_states[self.layer]


def resize_clip_positions(embeddings: nn.Module, grid: int) -> None:
    """Give a transformers CLIPVisionEmbeddings the position table of a `grid` x `grid` input, interpolated as the
    reference's CLIP `interpolate_pos_encoding` does: bicubic, scale factor (grid + 0.1) / old_grid (the DINO
    rounding guard), align_corners=False; the cls position is kept."""
    table = embeddings.position_embedding.weight.detach()
    old = int(round((table.shape[0] - 1) ** 0.5))
    if old == grid:
        return
    dim = table.shape[1]
    patch = table[1:].float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    factor = (grid + 0.1) / old
    patch = F.interpolate(patch, scale_factor=(factor, factor), mode="bicubic", align_corners=False)
    assert patch.shape[-2:] == (grid, grid), patch.shape
    new = torch.cat([table[:1].float(), patch.permute(0, 2, 3, 1).reshape(grid * grid, dim)]).to(table.dtype)
    embeddings.position_embedding = nn.Embedding.from_pretrained(new, freeze=True)
    embeddings.num_patches, embeddings.num_positions = grid * grid, grid * grid + 1
    embeddings.image_size = grid * embeddings.patch_size
    embeddings.position_ids = torch.arange(grid * grid + 1).expand((1, -1))


def clip_grid_check(clip_image: int, clip_patch: int, input_size: int, student_img: int, student_patch: int) -> int:
    """grid_check for a CLIP tower trained at `clip_image` px."""
    return grid_check("CLIP", clip_image, clip_patch, input_size, student_img, student_patch)


def clip_teacher(cfg: Config) -> ClipTeacher:
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
    t, student = cfg.teacher, cfg.model
    if not Path(t.weights).is_dir():
        raise ConfigError(f"teacher.weights={t.weights} must be a folder written by save_pretrained (CLIPModel, "
                          "CLIPVisionModelWithProjection, or for teacher.clip_target=hidden also CLIPVisionModel)")
    if t.clip_target == "post_norm_proj":
        model, info = CLIPVisionModelWithProjection.from_pretrained(t.weights, use_safetensors=True,
                                                                    output_loading_info=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ConfigError(f"teacher.weights={t.weights} lacks {missing[:4]}: teacher.clip_target=post_norm_proj "
                              "needs CLIP's visual projection; save CLIPModel or CLIPVisionModelWithProjection "
                              "(a CLIPVisionModel folder has no projection)")
    else:
        model = CLIPVisionModel.from_pretrained(t.weights, use_safetensors=True)
    vc = model.config
    grid = clip_grid_check(vc.image_size, vc.patch_size, t.input_size, student.img_size, student.patch_size)
    tower = model.vision_model if hasattr(model, "visual_projection") else model
    resize_clip_positions(tower.embeddings, grid)
    if t.layer > vc.num_hidden_layers:
        raise ConfigError(f"teacher.layer={t.layer} but the CLIP tower has {vc.num_hidden_layers} layers")
    size = t.input_size or student.img_size
    if _is_rank0():
        print(f"[dbot] teacher: CLIP vision tower from {t.weights}: /{vc.patch_size} patches at {size} px "
              f"({grid}x{grid}), target {t.clip_target}", flush=True)
    return ClipTeacher(model, t.layer, t.clip_target, size if size != student.img_size else 0).requires_grad_(False).eval()
