"""dbot-ds: dBOT ViT pre-training on DeepSpeed.

Using a trained encoder (after `dbot-export RUN --out DIR`); needs only torch, timm and safetensors:

    import dbot_ds
    model = dbot_ds.load_encoder("DIR")           # timm VisionTransformer, no head, eval mode
    feats = dbot_ds.encode(model, images)         # [B, 1 + N, D], cls token first

The export folder is also timm's Hugging Face Hub layout (config.json + model.safetensors), so timm alone loads it:
`timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)`; `huggingface_hub.upload_folder` publishes it.

Nothing here imports DeepSpeed; the implementations live in `dbot_ds.checkpoint.export` and are imported on first use.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

__all__ = ["load_encoder", "encode"]


def _private_extensions_dir() -> str:
    """A torch-extensions folder of this Python environment's own. On CPU, DeepSpeed JIT-builds C++ ops (the shm
    all-reduce; cpu_adam for offload) into ~/.cache/torch_extensions, shared by every environment of the user:
    two venvs then rebuild the same op in turn and wait on each other's lock files for minutes."""
    env = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dbot_ds" / "torch_extensions" / env)


os.environ.setdefault("TORCH_EXTENSIONS_DIR", _private_extensions_dir())   # before anything imports DeepSpeed


def load_encoder(export_dir, device="cpu", name: str = "encoder"):
    """Load a `dbot-export` folder as a timm `VisionTransformer` (num_classes=0), fp32, in eval mode on `device`.

    Reads `<export_dir>/<name>.json` (timm_arch, timm_kwargs) and `<export_dir>/<name>.safetensors` (safetensors,
    no pickle) and loads the weights with strict=True. `name="teacher"` loads an `--also-teacher` export; a folder
    holding only timm's hub layout (config.json + model.safetensors, e.g. DIR/teacher) loads too.
    Returns the `torch.nn.Module`."""
    from dbot_ds.checkpoint.export import load_encoder as _load_encoder
    return _load_encoder(export_dir, device=device, name=name)


def encode(model, images):
    """Features of `images` from a `load_encoder` model: timm's `forward_features`, all tokens [B, 1 + N, D]
    (cls first, after the final LayerNorm), under `torch.no_grad()`.

    `images`: [B, 3, H, W] at the training resolution. Float images must be normalised with the ImageNet mean/std
    ((x/255 - mean) / std, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)), as in training; uint8 images
    (0..255) are normalised for you. Inputs are moved to the model's device and dtype."""
    from dbot_ds.checkpoint.export import encode as _encode
    return _encode(model, images)
