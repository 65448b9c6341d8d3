"""Cross-size teachers (teacher.source=vit of another width, depth and patch size, with the teacher's input resized
so the token grids agree), the 3-stage presets, and the numerics options (teacher.precision,
optim.grad_reduce_dtype)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics

from dbot_ds.config import ConfigError, load_config
from dbot_ds.plan.stages import make_plan
from dbot_ds.teachers.placement import Teacher
from dbot_ds.teachers.resize import ResizedInput, grid_check
from dbot_ds.teachers.sources import vit_teacher

# student: vit_tiny_patch4, 32 px, /4 patches, 8x8 grid, 96 wide
BASE = ["schedule.stage_steps=[3]", "model.arch=vit_tiny_patch4"]


def timm_vit(img=32, patch=4, width=64, depth=2, heads=2):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, num_classes=0)
    with torch.no_grad():
        m.pos_embed.normal_(std=0.5)
    return m.eval()


def save(m, path):
    from safetensors.torch import save_file
    save_file(m.state_dict(), str(path))
    return path


def cfg_for(weights, *extra, heads=2):
    return load_config(overrides=BASE + ["teacher.source=vit", f"teacher.weights={weights}",
                                         f"teacher.num_heads={heads}", *extra])


def timm_at(m, x, size):
    """timm's own forward at another input size: positions interpolated as the reference does (bicubic,
    size=(g, g), align_corners=False), no final norm (reference tlayernorm=0)."""
    grid = size // m.patch_embed.patch_size[0]
    old = int((m.pos_embed.shape[1] - 1) ** 0.5)
    patch = m.pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    pos = torch.cat([m.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    tokens = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=m.patch_embed.patch_size)
    tokens = torch.cat([m.cls_token.expand(len(x), -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1) + pos
    return m.blocks(tokens)


def test_wider_deeper_teacher_with_the_same_patch_needs_no_resize(tmp_path):
    """ViT-L teaching ViT-B in miniature: a teacher of another width and depth (128 wide, 3 blocks), same /4 patch."""
    m = timm_vit(width=128, depth=3, heads=4)
    teacher, _ = vit_teacher(cfg_for(save(m, tmp_path / "l.safetensors"), heads=4))
    assert not isinstance(teacher, ResizedInput) and teacher.embed_dim == 128
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), timm_at(m, x, 32), atol=1e-5)


@pytest.mark.parametrize("img,patch,size", [(28, 2, 16),    # finer teacher (ViT-H/14 beside ViT-B/16: 196 px)
                                            (40, 5, 40)])   # coarser teacher (ViT-L/16 beside ViT-H/14: 256 px)
def test_other_patch_size_reads_the_resized_image_and_interpolated_positions(tmp_path, img, patch, size):
    m = timm_vit(img=img, patch=patch)               # trained on a 14x14 / 8x8 grid ... any grid but the student's
    cfg = cfg_for(save(m, tmp_path / "t.safetensors"), f"teacher.input_size={size}")
    teacher, _ = vit_teacher(cfg)
    assert isinstance(teacher, ResizedInput) and teacher.size == size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = teacher(x), timm_at(m, x, size)
    assert got.shape == (2, 65, 64) and torch.allclose(got, want, atol=1e-5)


def test_no_input_size_that_aligns_the_grids_names_the_one_that_works(tmp_path):
    path = save(timm_vit(img=28, patch=2), tmp_path / "p2.safetensors")
    with pytest.raises(ConfigError, match=r"/2 patches at teacher.input_size=32 px give a 16x16 grid.*8x8.*"
                                          r"Set teacher.input_size=16 .*trained at 28 px"):
        vit_teacher(cfg_for(path))
    with pytest.raises(ConfigError, match=r"7.5x7.5 grid.*Set teacher.input_size=16"):
        vit_teacher(cfg_for(path, "teacher.input_size=15"))
    # the real geometries of the official table's cross-size rows
    assert grid_check("ViT", 224, 14, 196, 224, 16) == 14       # ViT-H/14 teacher, ViT-B/16 student
    assert grid_check("ViT", 224, 16, 256, 224, 14) == 16       # ViT-L/16 teacher, ViT-H/14 student
    with pytest.raises(ConfigError, match="Set teacher.input_size=256"):
        grid_check("ViT", 224, 16, 0, 224, 14)
    with pytest.raises(ConfigError, match="teacher.input_size applies to teachers from other weights"):
        load_config(overrides=BASE + ["teacher.input_size=16"])


@pytest.mark.parametrize("name,student,teacher_arch,input_size,clip_grad,drop_path", [
    ("vit_b_from_l", "vit_base_patch16", "vit_large_patch16", 0, 3.0, 0.2),
    ("vit_b_from_h", "vit_base_patch16", "vit_huge_patch14", 196, 3.0, 0.2),
    ("vit_l_from_h", "vit_large_patch16", "vit_huge_patch14", 196, 0.0, 0.2)])   # the 86.8 row: L student, H teacher
def test_cross_size_presets(name, student, teacher_arch, input_size, clip_grad, drop_path):
    cfg = load_config(preset=name)
    m, t = cfg.model, cfg.teacher
    assert (m.arch, t.source, t.arch, t.input_size) == (student, "vit", teacher_arch, input_size)
    assert cfg.schedule.stage_epochs == [1600] and cfg.schedule.warmup_epochs == 40
    assert (cfg.optim.clip_grad, m.drop_path, cfg.data.resampled) == (clip_grad, drop_path, False)
    teacher_patch = int(teacher_arch[-2:])
    assert grid_check("ViT", 224, teacher_patch, input_size, m.img_size, m.patch_size) == 14 == m.img_size // m.patch_size


def test_vit_l_from_h_trains_two_steps_of_a_tiny_stand_in(tmp_path, shards):
    """The preset as published (L/16 student, frozen H/14 teacher at 196 px), shrunk: a /4 student at 32 px (8x8)
    and a /2 teacher trained at 28 px read at 16 px (8x8), its positions interpolated 14x14 -> 8x8. The loader
    cuts the teacher's 16 px view from each crop."""
    from conftest import run
    weights = save(timm_vit(img=28, patch=2), tmp_path / "h14_stand_in.safetensors")
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "dbot_ds.pretrain", "--preset", "vit_l_from_h", "model.arch=vit_tiny_patch4",
                f"teacher.weights={weights}", "teacher.arch=", "teacher.num_heads=2", "teacher.input_size=16",
                "schedule.stage_epochs=[]", "schedule.stage_steps=[2]", "schedule.warmup_epochs=0",
                "optim.global_batch=8", "optim.micro_batch=8", f"data.shards={shards}", "data.num_samples=0",
                "data.num_workers=0", f"run.out_dir={out}", "run.log_every=1", "run.progress=false"])
    assert proc.returncode == 0, proc.tail
    assert "patch 2 at 16 px (8x8)" in proc.stdout and "the teacher's own 16 px view" in proc.stdout
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 10 for r in rows)


@pytest.mark.parametrize("name,depths", [("vit_b_3stage", (12, 12, 12)), ("vit_l_3stage", (0, 24, 24))])
def test_three_stage_presets_plan(name, depths):
    cfg = load_config(preset=name)
    assert cfg.schedule.stage_epochs == [533, 533, 534] and sum(cfg.schedule.stage_epochs) == 1600
    plan = make_plan(cfg, steps_per_epoch=1281167 / 4096)
    assert plan.num_stages == 3 and plan.teacher_depths == depths
    assert abs(sum(plan.lengths) - 1600 * 1281167 / 4096) <= 3              # the 2-stage recipe's budget


# ------------------------------------------------------------------------------------------- numerics

def test_grad_reduce_dtype_maps_to_communication_data_type():
    from dbot_ds.distributed.engine import build_ds_config
    assert build_ds_config(load_config(preset="vit_b"), 2)["communication_data_type"] == "fp32"
    ds = build_ds_config(load_config(preset="vit_b", overrides=["optim.grad_reduce_dtype=bf16"]), 2)
    assert ds["communication_data_type"] == "bf16"
    ds = build_ds_config(load_config(preset="demo", overrides=["optim.precision=fp32"]), 2)
    assert ds["communication_data_type"] == "fp32"          # fp32 gradients are never reduced in bf16
    from deepspeed.runtime.config import get_communication_data_type
    assert get_communication_data_type(ds) == torch.float32
    with pytest.raises(ConfigError, match="optim.grad_reduce_dtype must be bf16 or fp32"):
        load_config(preset="demo", overrides=["optim.grad_reduce_dtype=fp16"])


def _encoder_state(cfg):
    from dbot_ds.model.vit import build_student
    return {k: v.detach().clone() for k, v in build_student(cfg.model, seed=0).encoder.named_parameters()}


@pytest.mark.parametrize("precision,weight_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_teacher_precision_keeps_exact_copies_in_its_weight_dtype(precision, weight_dtype):
    cfg = load_config(preset="demo", overrides=[f"teacher.precision={precision}"])
    state = _encoder_state(cfg)
    teacher = Teacher(cfg, torch.device("cpu"), torch.bfloat16)
    teacher.rebuild(cfg.model.depth, state)                    # the swap: fp32 master weights in
    for k, v in teacher.full_state().items():
        assert v.dtype == weight_dtype and torch.equal(v, state[k].to(weight_dtype)), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = teacher.module.float()(x) if precision == "fp32" else None
    if precision == "fp32":
        teacher.rebuild(cfg.model.depth, state)
        got = teacher(x.to(torch.bfloat16))
        assert got.dtype == torch.float32                        # residual stream kept in fp32
        assert F.cosine_similarity(got, ref, dim=-1).min() > 0.99
    else:
        assert teacher(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="teacher.precision must be bf16 or fp32"):
        load_config(preset="demo", overrides=["teacher.precision=fp16"])


def test_fp32_teacher_under_autocast_is_closer_to_fp32_than_bf16_weights():
    cfg = load_config(preset="demo")
    state = _encoder_state(cfg)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    out = {}
    for name, precision, compute in (("ref", "fp32", torch.float32), ("bf16", "bf16", torch.bfloat16),
                                     ("auto", "fp32", torch.bfloat16)):
        cfg.teacher.precision = precision
        t = Teacher(cfg, torch.device("cpu"), compute)
        t.rebuild(cfg.model.depth, state)
        out[name] = t(x.to(compute)).float()
    err = {k: ((out[k] - out["ref"]).norm() / out["ref"].norm()).item() for k in ("bf16", "auto")}
    assert 0 < err["auto"] < err["bf16"] < 0.05, err
