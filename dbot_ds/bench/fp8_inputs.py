"""`dbot-bench fp8`'s inputs: the real photos (a folder of them, else scikit-image's; `--save-photos` writes the
latter out), the random resized crops taken from them, and a `dbot-export` folder's teacher weights (`--weights`)."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Inputs


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


@functools.cache
def _photos(folder: str | None = None) -> tuple:
    """RGB PIL images: those in `folder` (sorted by name), else the photos bundled with scikit-image."""
    from PIL import Image
    if folder:
        files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in PHOTO_SUFFIXES)
        if not files:
            raise SystemExit(f"--photos {folder}: no .jpg/.jpeg/.png files in it")
        return tuple(Image.open(f).convert("RGB") for f in files)
    try:
        from .fixtures import load_photos
        return tuple(p for _, p in sorted(load_photos().items()))
    except ImportError as e:
        raise SystemExit(f"the real photos come from scikit-image, which is not installed here ({e}); save them on a "
                         "machine that has it with `dbot-bench fp8 --save-photos DIR`, copy DIR over and pass "
                         "--photos DIR") from None


def save_photos(folder: str) -> list[Path]:
    """Write the scikit-image photos as lossless PNGs, for `--photos` on a machine without scikit-image."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    from .fixtures import load_photos
    paths = []
    for name, img in sorted(load_photos().items()):
        paths.append(out / f"{name}.png")
        img.save(paths[-1])
    return paths


def photo_crops(num: int, size: int, seed: int, folder: str | None = None) -> torch.Tensor:
    """uint8 [num, 3, size, size]: random resized crops (area 20-100%, aspect 3/4-4/3, bicubic, random flip) of
    the scikit-image photos, the training augmentation's geometry on real image statistics."""
    from PIL import Image
    photos = _photos(folder)
    rng = np.random.default_rng(seed)
    out = np.empty((num, size, size, 3), np.uint8)
    for i in range(num):
        img = photos[int(rng.integers(len(photos)))]
        w, h = img.size
        area = rng.uniform(0.2, 1.0) * w * h
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, math.sqrt(area * aspect)), min(h, math.sqrt(area / aspect))
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = img.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_export(weights: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(our encoder state without the fixed pos_embed, encoder.json) of a `dbot-export` folder or file."""
    from safetensors.torch import load_file
    p = Path(weights)
    if p.suffix in (".safetensors", ".json"):
        p, name = p.parent, p.stem
    else:
        name = "encoder"
    st, js = p / f"{name}.safetensors", p / f"{name}.json"
    for f in (st, js):
        if not f.exists():
            raise SystemExit(f"--weights: {f} not found; give a `dbot-export RUN --out DIR` folder")
    info = json.loads(js.read_text())
    # timm's pos_embed is our fixed sin-cos table (a non-persistent buffer, rebuilt from the config)
    state = {k: v for k, v in load_file(str(st)).items() if k != "pos_embed"}
    return state, info
