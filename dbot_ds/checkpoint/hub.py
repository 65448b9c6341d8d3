"""timm's Hugging Face Hub layout of an export, written beside dbot-export's own files: `config.json` + `model.safetensors`.

    timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)      # reads this layout
    huggingface_hub.upload_folder(repo_id="OWNER/NAME", folder_path="DIR")  # publishes it as it is;
    timm.create_model("hf-hub:OWNER/NAME", pretrained=True, num_classes=0)  # then loads it from the Hub

`config.json` is written by timm's own `save_config_for_hf`, the function behind `timm.models.save_for_hf` and
`push_to_hf_hub`, for the export's timm model built on the meta device (no weights, no memory): `architecture`,
`num_classes` (0), `num_features`, `global_pool`, `model_args` (the export's `timm_kwargs`, plus what timm records:
`num_classes`, `in_chans`, `global_pool`, `img_size`) and a `pretrained_cfg` with the input size, dbot-eval's
evaluation crop (bicubic, crop_pct 0.875, centre) and the ImageNet mean/std the training normalised with.
`model.safetensors` is the export's own weights file hard-linked (copied where the filesystem has no hard links): the
tensors `save_for_hf` writes, under the same names; its header metadata adds format=pt, timm_arch, model_name, step.

One folder holds one Hub model, so the export named `encoder` (the student, or the teacher under `--which teacher`)
has it in the export folder itself and any other export (`--also-teacher`'s `teacher`) in a subfolder of its name:
`DIR/teacher/config.json` + `DIR/teacher/model.safetensors`. `load_hub_folder` loads a folder that holds only this
layout (a Hub download, `DIR/teacher/`) for `load_encoder`. Needs only torch, timm and safetensors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .export import IMAGENET_MEAN, IMAGENET_STD, _umask_mode

HUB_CONFIG = "config.json"             # timm.models._hub: load_model_config_from_path / _from_hf, save_config_for_hf
HUB_WEIGHTS = "model.safetensors"      # timm.models._hub.HF_SAFE_WEIGHTS_NAME: the file local-dir: and hf-hub: read first
EVAL_CROP_PCT = 0.875                  # dbot-eval's centre crop (evaluate/knn.py CROP_PCT), shorter side resized bicubic
EVAL_INTERPOLATION = "bicubic"


def hub_dir(out: Path, name: str) -> Path:
    """The folder of export `name`'s hub layout: the export folder for `encoder`, else `out/name` (`teacher/`)."""
    return Path(out) if name == "encoder" else Path(out) / name


def _img_size(info: dict) -> int:
    if info.get("img_size"):
        return int(info["img_size"])
    import timm
    with torch.device("meta"):
        model = timm.create_model(info["timm_arch"], pretrained=False, num_classes=0, **info["timm_kwargs"])
    return int(model.patch_embed.img_size[0])


def pretrained_cfg(info: dict) -> dict:
    """timm's `pretrained_cfg` of an export (its json record `info`): input size, evaluation crop, mean/std, no head
    (`num_classes` 0; `classifier` names the head timm adds when a head is asked for)."""
    size = _img_size(info)
    where = ", ".join(f"{k} {info[k]}" for k in ("stage", "step") if info.get(k) is not None)
    description = (f"dBOT {info.get('which', 'student')} encoder trained with dbot-ds: "
                   f"{info.get('model_name', info['timm_arch'])}" + (f"; {where}" if where else "")
                   + ". forward_features gives all tokens [B, 1 + N, D], cls first.")
    return dict(input_size=(3, size, size), fixed_input_size=True, interpolation=EVAL_INTERPOLATION,
                crop_pct=EVAL_CROP_PCT, crop_mode="center", mean=tuple(info.get("mean", IMAGENET_MEAN)),
                std=tuple(info.get("std", IMAGENET_STD)), num_classes=0, pool_size=None,
                first_conv="patch_embed.proj", classifier="head", description=description)


def hub_model(info: dict, device: str | torch.device = "meta") -> nn.Module:
    """`timm.create_model(timm_arch, num_classes=0, **timm_kwargs)` carrying the export's `pretrained_cfg`, on
    `device` (randomly initialised: load the weights into it)."""
    import timm
    with torch.device(device):
        return timm.create_model(info["timm_arch"], pretrained=False, num_classes=0,
                                 pretrained_cfg=pretrained_cfg(info), **info["timm_kwargs"])


def write_hub(out: Path, name: str, weights: Path, info: dict) -> list[Path]:
    """timm's hub layout of export `name` (weights file `weights`, json record `info`) in `hub_dir(out, name)`:
    model.safetensors (a hard link to `weights`, or a copy) and config.json by timm's `save_config_for_hf`.
    Each file is written under a temporary name and renamed into place; returns both paths."""
    from timm.models._hub import save_config_for_hf
    folder = hub_dir(out, name)
    folder.mkdir(parents=True, exist_ok=True)
    st, cfg = folder / HUB_WEIGHTS, folder / HUB_CONFIG
    tmp = folder / f".{HUB_WEIGHTS}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(weights, tmp)
    except OSError:                                   # no hard links here (some network / FUSE filesystems)
        shutil.copyfile(weights, tmp)
    os.replace(tmp, st)
    tmp.unlink(missing_ok=True)                       # rename() of two links to one file leaves the source
    tmp = folder / f".{HUB_CONFIG}.tmp"
    save_config_for_hf(hub_model(info), str(tmp), model_args=dict(info["timm_kwargs"]))
    os.replace(tmp, cfg)
    for f in (st, cfg):
        os.chmod(f, _umask_mode())
    return [st, cfg]


def is_hub_folder(folder: Path) -> bool:
    return (Path(folder) / HUB_CONFIG).is_file() and (Path(folder) / HUB_WEIGHTS).is_file()


def load_hub_folder(folder: Path) -> nn.Module:
    """A folder of timm's hub layout alone (config.json + model.safetensors) as its timm model with no head, built
    by timm from config.json and loaded with strict=True from safetensors (no pickle), on the CPU."""
    import timm
    from safetensors.torch import load_file
    model = timm.create_model(f"local-dir:{folder}", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(Path(folder) / HUB_WEIGHTS)), strict=True)
    return model
