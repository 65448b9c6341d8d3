"""FLOPs from the architecture against the reference table (shared REFERENCE.md), within 1%."""
import pytest

from dbot_ds.config import load_config
from dbot_ds.model.flops import mfu, step_flops_per_image, student_forward_flops, teacher_forward_flops


def arch(name):
    return load_config(overrides=["schedule.stage_steps=[1]", f"model.arch={name}"]).model


@pytest.mark.parametrize("name,depth,gflops", [
    ("vit_huge_patch14", 32, 626.5), ("vit_huge_patch14", 0, 292.3),
    ("vit_large_patch16", 24, 247.8), ("vit_large_patch16", 0, 125.0),
    ("vit_base_patch16", 12, 93.8),
])
def test_step_flops_match_reference(name, depth, gflops):
    got = step_flops_per_image(arch(name), depth)["model"] / 1e9
    assert abs(got / gflops - 1) < 0.01, got


def test_vit_h_parts_and_recompute():
    cfg = arch("vit_huge_patch14")
    assert abs(teacher_forward_flops(cfg, 32) / 1e9 / 334.6 - 1) < 0.01
    assert abs(3 * student_forward_flops(cfg) / 1e9 / 291.9 - 1) < 0.01
    cfg.act_ckpt_every = 1
    f = step_flops_per_image(cfg, 32, recompute=True)
    assert f["hardware"] == pytest.approx(f["model"] + f["student"] / 3)
    assert mfu(500.0, 626.5e9, 989.0) == pytest.approx(500 * 626.5e9 / 989e12)
