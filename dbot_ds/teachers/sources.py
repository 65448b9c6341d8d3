"""Teachers from other projects' weights (the paper's pre-trained-teacher setting): one stage, no swap.

- `vit`: a timm ViT state dict (`.safetensors`, or `.pth`/`.pt` as `timm.create_model(...).state_dict()` saves
  it), or the reference dBOT / MAE pre-training checkpoint (`{"model": state_dict, "args": Namespace}` with
  timm-style encoder keys; decoder keys are ignored). Width, depth, MLP ratio and patch size are read from the
  weights, so the teacher may be of another size than the student (the reference's cross-size rows: ViT-L or
  ViT-H teaching ViT-B, ViT-L teaching ViT-H). Its token grid must equal the student's: a teacher with another
  patch size reads the image resized to `teacher.input_size` (e.g. 196 px for a /14 teacher beside a /16
  student), and its position table is interpolated to that grid (bicubic, as the reference's
  `interpolate_pos_embed`). The head count is not in the weights: it comes from the
  checkpoint's metadata, else from `teacher.num_heads` / `teacher.arch`, else from a width that only one head
  count is known for (see `teacher_heads`).
- `hf_clip`: a Hugging Face CLIP vision tower saved with `save_pretrained` (clip.py).

Both fit their token grid to the student's with resize.py; `external_teacher` picks the source.

Nothing is unpickled: safetensors, or `torch.load(weights_only=True)` (which may rebuild one class besides
tensors and containers: the reference format's `argparse.Namespace`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from dbot_ds.config import ARCHS, Config, ConfigError, TeacherConfig
from dbot_ds.model.vit import Encoder

from .clip import clip_teacher
from .resize import ResizedInput, _is_rank0, grid_check, resize_pos_table

SOURCES = ("bootstrap", "vit", "hf_clip")
_IGNORED = re.compile(r"^(head|fc_norm|decoder|mask_token|predictor)")   # classifier / MAE decoder keys

# Heads of timm's plain cls-token ViTs by size: (width, heads). With our ARCHS they decide whether a width alone
# fixes the head count: only where all of them agree. 192 does not: timm's ViT-Tiny has 3 heads, our
# vit_small_patch8 has 6. (timm's other head counts at 768 and 1024, vit_base_patch16_gap and AIMv2, belong to
# models without a cls token, which this loader rejects anyway.)
_TIMM_VIT_HEADS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_medium": (512, 8), "vit_base": (768, 12),
                   "vit_large": (1024, 16), "vit_huge": (1280, 16), "vit_giant": (1408, 16),
                   "vit_gigantic": (1664, 16)}


# The globals that official dBOT / MAE pre-training checkpoints need besides tensors and plain containers, read
# from their `misc.save_model`: {"model", "optimizer" (torch AdamW state_dict: tensors, numbers, tuples, None),
# "epoch" (int), "scaler" (GradScaler.state_dict(): floats and ints), "args"}. Only `args` is an object: the
# argparse.Namespace of the command line (plain values), which is also the only record of the architecture.
REFERENCE_GLOBALS = [argparse.Namespace]
# Top-level entries of such a checkpoint that hold no encoder weights (reported as ignored, never used).
_REFERENCE_EXTRAS = ("optimizer", "epoch", "scaler", "args", "model_ema", "lr_scheduler")


def _refused(path: Path, e: Exception) -> ConfigError:
    """One line for a weights file that the weights-only loader refuses, naming the offending global(s)."""
    try:
        with torch.serialization.safe_globals(REFERENCE_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: fall back to torch's own message
        names = []
    what = f"it holds the pickle global {', '.join(names)}" if names else f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return ConfigError(f"teacher.weights={path} was refused by torch's weights-only loader ({what}); nothing in it "
                       "was run. Official dBOT/MAE checkpoints, timm state dicts and .safetensors load as they are; "
                       "re-save other files as a plain state dict of tensors (or .safetensors)")


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """(tensors of a weights file, the reference format's `args` or None), without unpickling other objects;
    unwraps {"model": ...} / {"state_dict": ...}. Use `describe_extras` for what the file held besides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher.weights={path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals(REFERENCE_GLOBALS):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the message says what to do
            raise _refused(path, e) from None
    args = state.get("args") if isinstance(state, dict) else None
    _EXTRAS[str(path)] = [k for k in _REFERENCE_EXTRAS if isinstance(state, dict) and k in state]
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path} does not hold a flat state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}
    return state, args if isinstance(args, argparse.Namespace) else None


_EXTRAS: dict[str, list[str]] = {}       # path -> top-level non-weight entries seen by load_state_file


def _vit_shape(state: dict[str, torch.Tensor], path: str) -> dict:
    """Teacher architecture read from its weights."""
    if "patch_embed.proj.weight" not in state:
        raise ConfigError(f"{path} has no patch_embed.proj.weight: not a ViT encoder state dict")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    return {"embed_dim": width, "patch_size": patch, "depth": depth, "mlp_ratio": mlp}


# ------------------------------------------------------------------------------------------- heads

def _known_heads(width: int) -> dict[str, int]:
    """Named ViTs of this width (ours and timm's) -> their head counts."""
    named = {name: a["num_heads"] for name, a in ARCHS.items() if a["embed_dim"] == width}
    named.update({f"timm's {name}": h for name, (w, h) in _TIMM_VIT_HEADS.items() if w == width})
    return named


def heads_of_width(width: int) -> int | None:
    """The head count every known ViT of this width has; None where they disagree or none is known."""
    heads = set(_known_heads(width).values())
    return heads.pop() if len(heads) == 1 else None


def _timm_shape(arch: str, kwargs: dict, where: str) -> tuple[int, int] | None:
    """(heads, width) of timm model `arch` built with `kwargs` on the meta device (no memory, no download); None
    if timm does not know `arch`."""
    import timm
    if not timm.is_model(arch):
        return None
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **{**kwargs, "num_classes": 0})   # timm configs carry num_classes
    except Exception as e:  # noqa: BLE001 - a bad metadata file: say which
        raise ConfigError(f"{where}: timm cannot build {arch} with {kwargs} ({e})") from e
    blocks = getattr(model, "blocks", None)
    return (blocks[0].attn.num_heads, model.embed_dim) if blocks else None


def _reference_shape(name: str) -> tuple[int, int] | None:
    """(heads, width) of a reference checkpoint's `args.model` (mae_vit_large_patch16,
    mae_vit_small_patch16_dec512d2b, ...): the encoder's name, without the prefix and the decoder suffix, in our
    ARCHS or timm's registry (where MAE's names lack the _224)."""
    base = re.sub(r"_dec\w*$", "", re.sub(r"^(mae|dbot)_", "", name))
    if base in ARCHS:
        return ARCHS[base]["num_heads"], ARCHS[base]["embed_dim"]
    for arch in (base, f"{base}_224"):
        if (shape := _timm_shape(arch, {}, f"args.model={name!r}")) is not None:
            return shape
    return None


def _read_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _metadata_heads(path: Path, args: argparse.Namespace | None) -> tuple[int, int, str] | None:
    """(heads, width, where) from the checkpoint's own metadata, or None where it has none: the reference
    format's `args.model`; `NAME.json` beside `NAME.safetensors` (dbot-export: `timm_arch` + `timm_kwargs`);
    `config.json` beside the weights (timm's hub layout: `architecture` + `model_args`). The `timm_arch` in an
    export's safetensors header is not used: without its kwargs it names only the generic timm entry point."""
    if args is not None and isinstance(getattr(args, "model", None), str):
        if (shape := _reference_shape(args.model)) is not None:
            return (*shape, f"args.model={args.model!r} in the checkpoint")
    for file, arch_key, kwargs_key in ((path.with_suffix(".json"), "timm_arch", "timm_kwargs"),
                                       (path.parent / "config.json", "architecture", "model_args")):
        info = _read_json(file)
        if isinstance(arch := info.get(arch_key), str):
            where = f"{file.name} beside the weights ({arch_key} {arch})"
            if (shape := _timm_shape(arch, dict(info.get(kwargs_key) or {}), where)) is not None:
                return (*shape, where)
    return None


def teacher_heads(t: TeacherConfig, width: int, path: Path, args: argparse.Namespace | None) -> tuple[int, str]:
    """(heads, where that number came from) for a `width`-wide ViT teacher. The weights do not hold the head
    count, and a wrong one changes the teacher's outputs silently, so it is never guessed: the checkpoint's
    metadata (which `teacher.num_heads` / `teacher.arch` must not contradict), else those settings, else a width
    that every known ViT builds with the same heads; otherwise a ConfigError asks for `teacher.num_heads`."""
    settings = {"teacher.num_heads": t.num_heads} if t.num_heads else {}
    if t.arch:
        settings[f"teacher.arch={t.arch}"] = ARCHS[t.arch]["num_heads"]
    meta = _metadata_heads(path, args)
    if meta is not None:
        heads, meta_width, where = meta
        if meta_width != width:
            raise ConfigError(f"teacher {path}: {where} describes a {meta_width}-wide ViT, but the weights are "
                              f"{width} wide: the metadata does not belong to these weights")
        wrong = [f"{k} gives {v}" for k, v in settings.items() if v != heads]
        if wrong:
            raise ConfigError(f"teacher {path}: {where} says {heads} heads, but {' and '.join(wrong)}; remove the "
                              "setting or fix it")
        return heads, where
    if t.num_heads:
        return t.num_heads, "teacher.num_heads"
    if t.arch:
        return ARCHS[t.arch]["num_heads"], f"teacher.arch={t.arch}"
    if (heads := heads_of_width(width)) is not None:
        return heads, f"width {width}: every known ViT of that width has {heads} heads"
    known = _known_heads(width)
    seen = ", ".join(f"{k} has {v}" for k, v in known.items()) or "no known ViT has this width"
    ours = [k for k in known if k in ARCHS]
    raise ConfigError(f"teacher {path}: the number of attention heads is not in the weights, no metadata beside them "
                      f"names the architecture, and width {width} does not fix it ({seen}). Set teacher.num_heads "
                      f"(e.g. teacher.num_heads={max(1, width // 64)} for 64-wide heads)"
                      + (f", or teacher.arch={ours[0]} if it is that architecture" if ours else ""))


def vit_teacher(cfg: Config) -> tuple[Encoder, list[str]]:
    """A frozen ViT teacher from a timm or MAE/dBOT checkpoint; returns (module, ignored keys)."""
    t, student = cfg.teacher, cfg.model
    state, args = load_state_file(t.weights)
    shape = _vit_shape(state, t.weights)
    pos = state.get("pos_embed")
    trained_grid = int(round((pos.shape[1] - 1) ** 0.5)) if pos is not None and pos.dim() == 3 else 0
    grid = grid_check("ViT", trained_grid * shape["patch_size"], shape["patch_size"], t.input_size, student.img_size,
                      student.patch_size)
    size = t.input_size or student.img_size
    expect = {}
    if t.arch:
        if t.arch not in ARCHS:
            raise ConfigError(f"teacher.arch '{t.arch}' is not one of {sorted(ARCHS)}")
        expect.update({k: ARCHS[t.arch][k] for k in ("embed_dim", "depth")})
    wrong = [f"{k}: checkpoint {shape[k]}, expected {v}" for k, v in expect.items() if shape[k] != v]
    if wrong:
        raise ConfigError(f"teacher checkpoint {t.weights} does not fit teacher.arch={t.arch}: {'; '.join(wrong)}")
    heads, heads_from = teacher_heads(t, shape["embed_dim"], Path(t.weights), args)
    if shape["embed_dim"] % heads:
        raise ConfigError(f"teacher {t.weights}: width {shape['embed_dim']} is not divisible by {heads} heads "
                          f"({heads_from})")
    tcfg = dataclasses.replace(student, img_size=size, patch_size=shape["patch_size"], embed_dim=shape["embed_dim"],
                               depth=shape["depth"], num_heads=heads, mlp_ratio=shape["mlp_ratio"], act_ckpt_every=0,
                               drop_path=0.0)
    module = Encoder(tcfg, shape["depth"], final_norm=t.final_norm)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"teacher checkpoint {t.weights} lacks encoder weights: {missing[:6]}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ConfigError(f"teacher checkpoint {t.weights} has mis-shaped weights: {bad[:4]}")
    module.load_state_dict({k: state[k] for k in own})
    if pos is not None:                                # timm: learned; MAE: its fixed sin-cos
        module.pos_embed.copy_(resize_pos_table(pos, grid, t.weights))
    used = set(own) | {"pos_embed"}
    unused = sorted(k for k in state if k not in used)
    unexpected = [k for k in unused if not _IGNORED.match(k) and not k.startswith("norm.")]
    if unexpected:
        raise ConfigError(f"teacher checkpoint {t.weights} has keys that fit no encoder weight: {unexpected[:6]}")
    if _is_rank0():
        print(f"[dbot] teacher: ViT from {t.weights}: width {shape['embed_dim']}, depth {shape['depth']}, {heads} heads "
              f"({heads_from}), patch {shape['patch_size']} at {size} px ({grid}x{grid}), mlp ratio "
              f"{shape['mlp_ratio']:g}, final norm {'on' if t.final_norm else 'off'}", flush=True)
        print(f"[dbot] teacher weights: used {len(used & set(state))} encoder tensors; ignored "
              f"{_ignored_summary(unused, _EXTRAS.get(str(t.weights), []))}", flush=True)
    if size != student.img_size:
        module = ResizedInput(module, size)
    return module.requires_grad_(False).eval(), unused


def _ignored_summary(unused: list[str], extras: list[str]) -> str:
    """'decoder (34 tensors), head (2 tensors), norm (2 tensors); optimizer, scaler, epoch, args' or 'nothing'."""
    groups: dict[str, int] = {}
    for k in unused:
        prefix = k.split(".")[0].split("_")[0] if k.startswith("decoder") else k.split(".")[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    parts = [", ".join(f"{g} ({n} tensor{'s' if n > 1 else ''})" for g, n in groups.items())] if groups else []
    parts += [", ".join(extras)] if extras else []
    return "; ".join(parts) or "nothing"


def external_teacher(cfg: Config) -> tuple[nn.Module, int]:
    """(frozen teacher module in fp32 on the CPU, its output width) for teacher.source vit / hf_clip."""
    if cfg.teacher.source == "vit":
        module, _ = vit_teacher(cfg)
        return module, module.embed_dim
    module = clip_teacher(cfg)
    return module, module.out_dim
