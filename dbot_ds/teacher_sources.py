"""Teachers from other projects' weights (the paper's pre-trained-teacher setting): one stage, no swap.

- `vit`: a timm ViT state dict (`.safetensors`, or `.pth`/`.pt` as `timm.create_model(...).state_dict()` saves
  it), or the reference dBOT / MAE pre-training checkpoint (`{"model": state_dict}` with timm-style encoder
  keys; decoder keys are ignored). Width, depth and MLP ratio are read from the weights; the patch size and
  token grid must equal the student's.
- `hf_clip`: a Hugging Face CLIP vision tower saved with `save_pretrained` (loaded from a local folder); the
  target is its last hidden state (or `teacher.layer`), whose 1 + N tokens must line up with the student's grid.

Nothing is unpickled: safetensors, or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from .config import ARCHS, Config, ConfigError
from .data import IMAGENET_MEAN, IMAGENET_STD
from .models import Encoder

SOURCES = ("bootstrap", "vit", "hf_clip")
_IGNORED = re.compile(r"^(head|fc_norm|decoder|mask_token|predictor)")   # classifier / MAE decoder keys


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file without unpickling objects; unwraps {"model": ...} / {"state_dict": ...}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher.weights={path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the message says what to do
            raise ConfigError(f"cannot load {path} with torch.load(weights_only=True) ({e}); save the state dict as "
                              ".safetensors or as plain tensors") from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path} does not hold a flat state dict of tensors")
    return {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}


def _vit_shape(state: dict[str, torch.Tensor], path: str) -> dict:
    """Teacher architecture read from its weights."""
    if "patch_embed.proj.weight" not in state:
        raise ConfigError(f"{path} has no patch_embed.proj.weight: not a ViT encoder state dict")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    return {"embed_dim": width, "patch_size": patch, "depth": depth, "mlp_ratio": mlp}


def _default_heads(width: int) -> int:
    """Heads are not in the weights: the named architecture of this width (ViT-H: 16, not 1280 / 64), else 64-wide."""
    named = [a["num_heads"] for a in ARCHS.values() if a["embed_dim"] == width]
    return named[0] if named else max(1, width // 64)


def vit_teacher(cfg: Config) -> tuple[Encoder, list[str]]:
    """A frozen ViT teacher from a timm or MAE/dBOT checkpoint; returns (module, ignored keys)."""
    t, student = cfg.teacher, cfg.model
    state = load_state_file(t.weights)
    shape = _vit_shape(state, t.weights)
    expect = {"patch_size": student.patch_size}
    if t.arch:
        if t.arch not in ARCHS:
            raise ConfigError(f"teacher.arch '{t.arch}' is not one of {sorted(ARCHS)}")
        expect.update({k: ARCHS[t.arch][k] for k in ("embed_dim", "depth")})
    wrong = [f"{k}: checkpoint {shape[k]}, expected {v}" for k, v in expect.items() if shape[k] != v]
    if wrong:
        raise ConfigError(f"teacher checkpoint {t.weights} does not fit: {'; '.join(wrong)} (the patch size must "
                          "equal model.patch_size so teacher and student tokens line up)")
    heads = t.num_heads or (ARCHS[t.arch]["num_heads"] if t.arch else _default_heads(shape["embed_dim"]))
    tcfg = dataclasses.replace(student, embed_dim=shape["embed_dim"], depth=shape["depth"], num_heads=heads,
                               mlp_ratio=shape["mlp_ratio"], act_ckpt_every=0, drop_path=0.0)
    module = Encoder(tcfg, shape["depth"], final_norm=t.final_norm)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"teacher checkpoint {t.weights} lacks encoder weights: {missing[:6]}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ConfigError(f"teacher checkpoint {t.weights} has mis-shaped weights: {bad[:4]}")
    module.load_state_dict({k: state[k] for k in own})
    if "pos_embed" in state:                           # timm: learned; MAE: its fixed sin-cos
        pos = state["pos_embed"]
        if pos.shape != module.pos_embed.shape:
            raise ConfigError(f"teacher pos_embed {tuple(pos.shape)} does not match the student's token grid "
                              f"{tuple(module.pos_embed.shape)} (model.img_size={student.img_size})")
        module.pos_embed.copy_(pos)
    used = set(own) | {"pos_embed"}
    unused = sorted(k for k in state if k not in used)
    unexpected = [k for k in unused if not _IGNORED.match(k) and not k.startswith("norm.")]
    if unexpected:
        raise ConfigError(f"teacher checkpoint {t.weights} has keys that fit no encoder weight: {unexpected[:6]}")
    return module.requires_grad_(False).eval(), unused


class ClipTeacher(nn.Module):
    """A transformers CLIP vision tower as teacher: ImageNet-normalised images -> hidden states [B, 1 + N, D]."""

    def __init__(self, model: nn.Module, layer: int):
        super().__init__()
        self.model, self.layer = model, layer
        c = model.config
        mean_in, std_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean, std = torch.tensor(c.image_mean if hasattr(c, "image_mean") else (0.48145466, 0.4578275, 0.40821073)), \
            torch.tensor(c.image_std if hasattr(c, "image_std") else (0.26862954, 0.26130258, 0.27577711))
        # x_clip = (x_in * std_in + mean_in - mean) / std, as one affine map per channel
        self.register_buffer("scale", (std_in / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_in - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        out = self.model(pixel_values=x, output_hidden_states=self.layer >= 0)
        return out.last_hidden_state if self.layer < 0 else out.hidden_states[self.layer]


def clip_teacher(cfg: Config) -> ClipTeacher:
    from transformers import CLIPVisionModel
    t, student = cfg.teacher, cfg.model
    if not Path(t.weights).is_dir():
        raise ConfigError(f"teacher.weights={t.weights} must be a folder written by CLIPVisionModel.save_pretrained")
    model = CLIPVisionModel.from_pretrained(t.weights, use_safetensors=True)
    vc = model.config
    grid, student_grid = vc.image_size // vc.patch_size, student.img_size // student.patch_size
    if vc.image_size != student.img_size or grid != student_grid:
        raise ConfigError(f"CLIP teacher sees {vc.image_size} px in a {grid}x{grid} grid of /{vc.patch_size} patches; "
                          f"the student sees {student.img_size} px in {student_grid}x{student_grid} /"
                          f"{student.patch_size} patches: the tokens cannot be aligned. Use a student with the same "
                          f"image size and patch size (e.g. model.patch_size={vc.patch_size} "
                          f"model.img_size={vc.image_size})")
    if t.layer > vc.num_hidden_layers:
        raise ConfigError(f"teacher.layer={t.layer} but the CLIP tower has {vc.num_hidden_layers} layers")
    return ClipTeacher(model, t.layer).requires_grad_(False).eval()


def external_teacher(cfg: Config) -> tuple[nn.Module, int]:
    """(frozen teacher module in fp32 on the CPU, its output width) for teacher.source vit / hf_clip."""
    if cfg.teacher.source == "vit":
        module, _ = vit_teacher(cfg)
        return module, module.embed_dim
    module = clip_teacher(cfg)
    return module, module.model.config.hidden_size
