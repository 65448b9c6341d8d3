"""The dbot-export format: an encoder as a timm `VisionTransformer` (safetensors + JSON), written and loaded.

`DIR/encoder.safetensors` holds a timm state dict (fp32) that loads with `strict=True` into
`timm.create_model(timm_arch, num_classes=0, **timm_kwargs)`, both read from `DIR/encoder.json` (which also
records the arch, stage, step, source checkpoint and the full training config). `dbot_ds.load_encoder(DIR)` does
that and returns the model in eval mode; `dbot_ds.encode(model, images)` gives all tokens [B, 1 + N, D].

Beside them every writer puts timm's Hugging Face Hub layout (hub.py): `DIR/config.json` + `DIR/model.safetensors`
(a hard link to encoder.safetensors), which `timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)`
loads and `huggingface_hub.upload_folder` publishes as it is. Another export in the folder (`--also-teacher`:
teacher.safetensors + teacher.json) has its hub layout in `DIR/teacher/`.

This module owns the format: encoder weights checked against the model config, the matching timm model, the
writers (`write_stage_encoder`, the trainer's stage-end copy) and the loaders (`load_encoder`, `encode`,
`timm_encoder` for the kNN monitor). The `dbot-export` command, which finds a checkpoint and reads its weights,
is export_cli.py. Needs only torch, timm and safetensors (no pickle, no DeepSpeed).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from dbot_ds.config import ModelConfig
from dbot_ds.model.vit import Encoder, sincos_pos_embed_2d

FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # the normalisation used in training (dbot_ds.data.augment.normalize)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The timm entry point used (with every shape argument given) when no named timm model has our shape.
GENERIC_TIMM_ARCH = "vit_base_patch16_224"


class ExportError(RuntimeError):
    """A problem the user must fix (wrong path, incomplete checkpoint, nothing exportable); the message says how."""


# ----------------------------------------------------------------------------------------------------------
# Encoder weights


def _check_against_encoder(state: dict[str, torch.Tensor], mcfg: ModelConfig, depth: int, final_norm: bool,
                           what: str) -> None:
    with torch.device("meta"):
        ref = Encoder(mcfg, depth, final_norm=final_norm).state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in ref.items()}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [k for k in set(got) & set(want) if got[k] != want[k]]
        raise ExportError(f"the {what} weights do not match the checkpoint's model config "
                          f"({mcfg.arch}, depth {depth}): missing {missing[:5]}, unexpected {extra[:5]}, "
                          f"shape differs {sorted(shapes)[:5]}")


def to_timm_state(state: dict[str, torch.Tensor], mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Encoder weights -> timm VisionTransformer state dict: add the fixed sin-cos `pos_embed` [1, 1 + N, D]."""
    out = dict(state)
    out["pos_embed"] = sincos_pos_embed_2d(mcfg.embed_dim, mcfg.img_size // mcfg.patch_size)[None].contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------
# Matching a timm model


def _timm_mismatch(arch: str, kwargs: dict, state: dict[str, torch.Tensor], mcfg: ModelConfig) -> str | None:
    """None if `timm.create_model(arch, num_classes=0, **kwargs)` has exactly our keys, shapes and layer types."""
    import timm
    if arch not in timm.list_models():
        return f"{arch} is not a timm model"
    try:
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as e:                 # a named model refusing an argument: try the next candidate
        return f"timm refused {arch}({kwargs}): {e}"
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        return f"{arch}: state dict differs ({sorted(set(got) ^ set(want))[:4]} / shapes)"
    checks = {
        "patch size": tuple(m.patch_embed.patch_size) == (mcfg.patch_size,) * 2,
        "img size": tuple(m.patch_embed.img_size) == (mcfg.img_size,) * 2,
        "cls token": m.has_class_token and m.num_prefix_tokens == 1 and not m.no_embed_class,
        "pre-norm": isinstance(m.norm_pre, nn.Identity),
        "heads": all(b.attn.num_heads == mcfg.num_heads for b in m.blocks),
        "activation": all(type(b.mlp.act) is nn.GELU and b.mlp.act.approximate == "none" for b in m.blocks),
        "norm eps": all(abs(mod.eps - 1e-6) < 1e-12 for mod in m.modules() if isinstance(mod, nn.LayerNorm)),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"{arch}: differs in {', '.join(bad)}" if bad else None


def timm_spec(mcfg: ModelConfig, state: dict[str, torch.Tensor], depth: int, final_norm: bool) -> tuple[str, dict]:
    """(timm_arch, timm_kwargs) for the timm VisionTransformer that holds `state` (timm keys, pos_embed included).
    Prefers a named timm model (e.g. vit_huge_patch14_224, with img_size=448 when trained at 448 px); otherwise
    the generic entry point with every shape argument. Each candidate is built on the meta device and checked."""
    extra = {} if final_norm else {"final_norm": False}
    shape = dict(img_size=mcfg.img_size, patch_size=mcfg.patch_size, embed_dim=mcfg.embed_dim, depth=depth,
                 num_heads=mcfg.num_heads, mlp_ratio=mcfg.mlp_ratio)
    candidates = [(f"{mcfg.arch}_{mcfg.img_size}", dict(extra)),
                  (f"{mcfg.arch}_224", dict(img_size=mcfg.img_size, **extra)),
                  (GENERIC_TIMM_ARCH, dict(shape, **extra))]
    reasons = []
    for arch, kwargs in candidates:
        why = _timm_mismatch(arch, kwargs, state, mcfg)
        if why is None:
            return arch, kwargs
        reasons.append(why)
    raise ExportError("no timm VisionTransformer matches these weights: " + "; ".join(reasons))


# ----------------------------------------------------------------------------------------------------------
# Export


def _model_name(timm_arch: str, mcfg: ModelConfig, depth: int) -> str:
    """An honest name: timm's named model, or a custom shape built through timm's generic entry point (whose
    name, vit_base_patch16_224, says nothing about the shape)."""
    if timm_arch != GENERIC_TIMM_ARCH or (mcfg.arch == "vit_base_patch16" and mcfg.img_size == 224):
        return timm_arch
    return (f"custom ViT: width {mcfg.embed_dim}, depth {depth}, {mcfg.num_heads} heads, patch {mcfg.patch_size}, "
            f"{mcfg.img_size} px (timm's generic {GENERIC_TIMM_ARCH} entry point with timm_kwargs)")


def _umask_mode() -> int:
    """The mode a new file gets from the user's umask (safetensors writes 0600 whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def export_paths(out: Path, name: str) -> list[Path]:
    """The files export `name` has in folder `out`: NAME.safetensors, NAME.json, then its hub layout (hub.py)."""
    from .hub import HUB_CONFIG, HUB_WEIGHTS, hub_dir
    return [out / f"{name}.safetensors", out / f"{name}.json", hub_dir(out, name) / HUB_WEIGHTS,
            hub_dir(out, name) / HUB_CONFIG]


def _write_export(out: Path, name: str, state: dict[str, torch.Tensor], info: dict,
                  hub_required: bool = True) -> list[Path]:
    """NAME.safetensors + NAME.json in `out`, then the hub layout (hub.write_hub); returns the 4 paths, those first.
    With `hub_required=False` (the trainer's stage end) a hub layout that timm fails to write only warns."""
    from safetensors.torch import save_file
    from .hub import write_hub
    out.mkdir(parents=True, exist_ok=True)
    st, js = out / f"{name}.safetensors", out / f"{name}.json"
    tmp = out / f".{name}.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"format": "pt", "timm_arch": info["timm_arch"], "model_name": info["model_name"],
                        "step": str(info["step"])})
    os.replace(tmp, st)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, js)
    for f in (st, js):
        os.chmod(f, _umask_mode())
    try:
        return [st, js] + write_hub(out, name, st, info)
    except Exception as e:                     # noqa: BLE001 - a disk error still stops; timm's own only warns
        if hub_required or isinstance(e, OSError):
            raise
        for f in export_paths(out, name)[2:]:  # no stale hub files beside new weights
            f.unlink(missing_ok=True)
        print(f"[dbot-ds] warning: timm's hub layout (config.json + model.safetensors) was not written in {out} "
              f"({e!r}); `dbot-export RUN --stage K --out DIR` writes it from the kept encoder", file=sys.stderr)
        return [st, js]


def _timm_export(state: dict[str, torch.Tensor], mcfg: ModelConfig, depth: int,
                 final_norm: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, the shape part of the json record) of encoder weights `state` (our names)."""
    timm_state = to_timm_state(state, mcfg)
    timm_arch, timm_kwargs = timm_spec(mcfg, timm_state, depth, final_norm)
    return timm_state, {
        "format_version": FORMAT_VERSION,
        "timm_arch": timm_arch,
        "timm_kwargs": timm_kwargs,
        "model_name": _model_name(timm_arch, mcfg, depth),
        "load": f"timm.create_model({timm_arch!r}, num_classes=0, **timm_kwargs).load_state_dict("
                "safetensors.torch.load_file(...), strict=True)",
        "arch": mcfg.arch,
        "img_size": mcfg.img_size, "patch_size": mcfg.patch_size, "embed_dim": mcfg.embed_dim, "depth": depth,
        "num_heads": mcfg.num_heads, "mlp_ratio": mcfg.mlp_ratio, "final_norm": final_norm,
        "num_params": sum(v.numel() for v in state.values()),
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "output": "forward_features: all tokens [B, 1 + N, D], cls first"
                  + (", after the final LayerNorm" if final_norm else ", no final LayerNorm"),
    }


def write_stage_encoder(state: dict[str, torch.Tensor], cfg, out: Path, stage: int, step: int) -> list[Path]:
    """The trainer's stage-end copy of the student encoder (fp32 master weights, final norm included, our names)
    as an export folder `out` (encoder.safetensors + encoder.json, and timm's hub layout: model.safetensors +
    config.json), written before the swap replaces it."""
    mcfg = cfg.model
    _check_against_encoder(state, mcfg, mcfg.depth, True, "student encoder")
    timm_state, info = _timm_export({k: v.float().contiguous() for k, v in state.items()}, mcfg, mcfg.depth, True)
    info.update({"which": "student", "weights": "fp32 (DeepSpeed master weights at the stage end)",
                 "trained_in_stage": stage, "stage": stage, "step": step, "tag": None, "stage_end": True,
                 "config": cfg.to_dict()})
    return _write_export(out, "encoder", timm_state, info, hub_required=False)    # a stage end never fails on it


# ----------------------------------------------------------------------------------------------------------
# Loading an export (torch + timm + safetensors only)


def _export_files(export_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    p = Path(export_dir)
    if p.suffix in (".safetensors", ".json"):
        p, name = p.parent, p.stem
    st, js = p / f"{name}.safetensors", p / f"{name}.json"
    for f in (st, js):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found; create it with `dbot-export RUN --out {p}`")
    return st, js


def _timm_model(timm_arch: str, timm_kwargs: dict, timm_state: dict[str, torch.Tensor]) -> nn.Module:
    """`timm.create_model(timm_arch, num_classes=0, **timm_kwargs)` holding `timm_state` (strict), on the CPU."""
    import timm
    model = timm.create_model(timm_arch, pretrained=False, num_classes=0, **timm_kwargs)
    model.load_state_dict(timm_state, strict=True)
    return model


def timm_encoder(state: dict[str, torch.Tensor], mcfg: ModelConfig, depth: int | None = None,
                 final_norm: bool = True) -> nn.Module:
    """Encoder weights `state` (our names, no pos_embed) as the timm VisionTransformer that `dbot-export` would
    write and `load_encoder` would return for them: fp32, eval mode, on the CPU. The kNN monitor scores a stage's
    encoder through it, so its numbers are those of `dbot-eval` on the stage's export."""
    depth = mcfg.depth if depth is None else depth
    _check_against_encoder(state, mcfg, depth, final_norm, "encoder")
    timm_state, info = _timm_export({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, mcfg,
                                    depth, final_norm)
    return _timm_model(info["timm_arch"], info["timm_kwargs"], timm_state).eval()


def load_encoder(export_dir: str | os.PathLike, device: str | torch.device = "cpu", name: str = "encoder") -> nn.Module:
    """The exported encoder as a timm VisionTransformer (no head), fp32, in eval mode on `device`.

    `export_dir` is a `dbot-export --out` folder (or the path of its .safetensors/.json); `name="teacher"` loads
    the `--also-teacher` export. A folder holding only timm's hub layout (config.json + model.safetensors: a Hub
    download, an export's `teacher/`) loads too. Weights are read with safetensors (no pickle) and loaded with
    strict=True. The model's `pretrained_cfg` is the one the export's config.json holds (training normalisation,
    ImageNet mean/std; input size; evaluation crop), so `timm.data.resolve_data_config(model=model)` gives
    matching eval transforms, and `timm.models.save_for_hf(model, ...)` writes that config.json again."""
    from safetensors.torch import load_file
    from .hub import hub_dir, hub_model, is_hub_folder, load_hub_folder
    p = Path(export_dir)
    if p.is_dir() and not (p / f"{name}.json").exists() and is_hub_folder(hub_dir(p, name)):
        return load_hub_folder(hub_dir(p, name)).to(device).eval()
    st, js = _export_files(export_dir, name)
    info = json.loads(js.read_text())
    model = hub_model(info, "cpu")                          # folders written before config.json: the same cfg
    model.load_state_dict(load_file(str(st)), strict=True)
    model.pretrained_cfg["file"] = str(st)                  # timm's field for the weights' local path
    return model.to(device).eval()


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All tokens of `images` through a `load_encoder` model: timm's `forward_features`, [B, 1 + N, D] (cls first),
    after the final LayerNorm, exactly what the dBOT encoder computed in training.

    `images` is [B, 3, H, W] at the export's img_size: float images must already be normalised with the ImageNet
    mean/std (`(x/255 - mean) / std`, as in training); uint8 images (0..255) are normalised here. They are moved
    to the model's device and dtype."""
    p = next(model.parameters())
    if images.dtype == torch.uint8:
        mean = torch.tensor(IMAGENET_MEAN, device=p.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=p.device).view(1, 3, 1, 1) * 255
        images = (images.to(p.device).float() - mean) / std
    return model.forward_features(images.to(p.device, p.dtype))
