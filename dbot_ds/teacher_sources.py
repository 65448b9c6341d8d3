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
- `hf_clip`: a Hugging Face CLIP vision tower saved with `save_pretrained` (loaded from a local folder); the
  target is its last hidden state (or `teacher.layer`), whose 1 + N tokens must line up with the student's grid.

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
import torch.nn.functional as F
from torch import nn

from .config import ARCHS, Config, ConfigError, TeacherConfig
from .data import IMAGENET_MEAN, IMAGENET_STD
from .models import Encoder

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
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
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


def _is_rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    """A teacher that reads the student's images resized to `size` px, so that a teacher with another patch size
    sees the student's token grid (the reference feeds such a teacher a second view at `--second_input_size`)."""

    def __init__(self, encoder: nn.Module, size: int):
        super().__init__()
        self.encoder, self.size = encoder, size
        self.embed_dim = encoder.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(resize_images(images, self.size))


def _ignored_summary(unused: list[str], extras: list[str]) -> str:
    """'decoder (34 tensors), head (2 tensors), norm (2 tensors); optimizer, scaler, epoch, args' or 'nothing'."""
    groups: dict[str, int] = {}
    for k in unused:
        prefix = k.split(".")[0].split("_")[0] if k.startswith("decoder") else k.split(".")[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    parts = [", ".join(f"{g} ({n} tensor{'s' if n > 1 else ''})" for g, n in groups.items())] if groups else []
    parts += [", ".join(extras)] if extras else []
    return "; ".join(parts) or "nothing"


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
            # The reference crops once and resizes the crop to each size with PIL bicubic; this resizes the
            # student's 224 px view instead (bicubic commutes with the per-channel affine above).
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


def external_teacher(cfg: Config) -> tuple[nn.Module, int]:
    """(frozen teacher module in fp32 on the CPU, its output width) for teacher.source vit / hf_clip."""
    if cfg.teacher.source == "vit":
        module, _ = vit_teacher(cfg)
        return module, module.embed_dim
    module = clip_teacher(cfg)
    return module, module.out_dim
