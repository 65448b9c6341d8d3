"""Teachers from other projects' weights: timm safetensors, the reference MAE/dBOT format, a transformers CLIP
vision tower (in-process, and for a few steps under the deepspeed launcher with 2 processes)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, run, torchrun_cmd
from testkit import clip_reference

from dbot_ds.config import ConfigError, load_config
from dbot_ds.teachers.clip import clip_teacher
from dbot_ds.teachers.sources import vit_teacher

BASE = ["schedule.stage_steps=[3]", "model.arch=vit_tiny_patch4"]   # student: 32 px, /4 patches, 8x8 grid


def timm_vit(width=64, patch=4, depth=2, heads=2):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, num_classes=10)
    with torch.no_grad():                                   # make the learned position embedding non-trivial
        m.pos_embed.normal_(std=0.5)
    return m.eval()


def cfg_for(weights, *extra):
    return load_config(overrides=BASE + ["teacher.source=vit", f"teacher.weights={weights}", "teacher.num_heads=2",
                                         *extra])


def test_timm_safetensors_teacher_uses_every_encoder_key(tmp_path):
    from safetensors.torch import save_file
    m = timm_vit()
    save_file(m.state_dict(), str(tmp_path / "vit.safetensors"))
    teacher, unused = vit_teacher(cfg_for(tmp_path / "vit.safetensors", "teacher.final_norm=true"))
    assert unused == ["head.bias", "head.weight"]            # no missing key; only the classifier is left out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m.forward_features(x), atol=1e-5)
    no_norm, _ = vit_teacher(cfg_for(tmp_path / "vit.safetensors"))      # reference default: no final norm
    with torch.no_grad():
        assert not torch.allclose(no_norm(x), m.forward_features(x), atol=1e-3)


def test_reference_mae_format_ignores_the_decoder(tmp_path):
    m = timm_vit()
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("head")}
    state.update({"decoder_embed.weight": torch.zeros(32, 64), "mask_token": torch.zeros(1, 1, 32),
                  "decoder_blocks.0.mlp.fc1.weight": torch.zeros(64, 32), "decoder_pred.weight": torch.zeros(64, 32)})
    torch.save({"model": state, "epoch": 799}, tmp_path / "checkpoint-799.pth")
    teacher, unused = vit_teacher(cfg_for(tmp_path / "checkpoint-799.pth", "teacher.final_norm=true"))
    assert all(k.startswith(("decoder", "mask_token")) for k in unused)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m.forward_features(x), atol=1e-5)


def test_wrong_width_or_patch_fails_naming_the_mismatch(tmp_path):
    from safetensors.torch import save_file
    save_file(timm_vit(width=64).state_dict(), str(tmp_path / "w64.safetensors"))
    with pytest.raises(ConfigError, match="embed_dim: checkpoint 64, expected 96"):
        vit_teacher(cfg_for(tmp_path / "w64.safetensors", "teacher.arch=vit_tiny_patch4"))
    save_file(timm_vit(patch=8).state_dict(), str(tmp_path / "p8.safetensors"))
    with pytest.raises(ConfigError, match=r"/8 patches at teacher.input_size=32 px give a 4x4 grid.*8x8.*"
                                          r"Set teacher.input_size=64"):
        vit_teacher(cfg_for(tmp_path / "p8.safetensors"))          # another patch size: see test_cross_size.py
    with pytest.raises(ConfigError, match="needs teacher.weights"):
        load_config(overrides=BASE + ["teacher.source=vit"])
    with pytest.raises(ConfigError, match="one stage"):
        load_config(overrides=["schedule.stage_steps=[3,3]", "teacher.source=vit", "teacher.weights=x"])


def save_clip(folder, patch=4):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=patch, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(folder)
    return CLIPVisionModel.from_pretrained(folder).eval()


def test_clip_teacher_matches_transformers_in_process(tmp_path):
    ref = save_clip(tmp_path / "clip")
    x = torch.randn(2, 3, 32, 32)
    for layer in (-1, 1):
        cfg = load_config(overrides=BASE + ["teacher.source=hf_clip", f"teacher.weights={tmp_path / 'clip'}",
                                            f"teacher.layer={layer}"])
        with torch.no_grad():
            got, want = clip_teacher(cfg)(x), clip_reference(ref, x, layer)
        assert got.shape == (2, 65, 64) and torch.allclose(got, want, atol=1e-5)
    save_clip(tmp_path / "clip8", patch=8)
    with pytest.raises(ConfigError, match="cannot be aligned"):
        clip_teacher(load_config(overrides=BASE + ["teacher.source=hf_clip", f"teacher.weights={tmp_path / 'clip8'}"]))


@pytest.mark.slow
def test_clip_teacher_under_deepspeed_two_processes(tmp_path, shards):
    save_clip(tmp_path / "clip")
    out = tmp_path / "probe"
    proc = run(torchrun_cmd(2) + ["tests/teacher_probe.py", str(out)] + TINY + [
        f"data.shards={shards}", f"run.out_dir={tmp_path / 'run'}", "schedule.stage_steps=[3]",
        "schedule.warmup_steps=1", "run.log_every=1", "teacher.source=hf_clip", f"teacher.weights={tmp_path / 'clip'}"])
    assert proc.returncode == 0, proc.tail
    for rank in (0, 1):
        r = json.loads((tmp_path / f"probe.rank{rank}.json").read_text())
        assert r["target_shape"] == [8, 65, 64] and r["predictor_out"] == 64     # the predictor follows CLIP's width
        assert r["max_abs_diff"] <= 0.05 * r["target_std"]                       # bf16 teacher vs fp32 transformers
        assert r["losses"] and all(l == l for l in r["losses"])


# ------------------------------------------------------------------------------------------- heads
# A ViT-Tiny-shaped teacher (192 wide, 3 heads; 2 blocks and /4 patches to fit the 32 px test student). Width
# 192 alone does not fix the heads: timm's ViT-Tiny has 3, our vit_small_patch8 has 6.

def tiny_cfg(weights, *extra):
    return load_config(overrides=BASE + ["teacher.source=vit", f"teacher.weights={weights}", *extra])


def sharp_tiny_vit():
    """timm ViT, 192 wide with 3 heads, whose attention is peaked: at init (std 0.02) every head attends almost
    uniformly and the head count hardly shows in the outputs; a trained teacher's does."""
    m = timm_vit(width=192, heads=3)
    with torch.no_grad():
        for block in m.blocks:
            block.attn.qkv.weight.mul_(10)
    return m


def test_heads_come_only_from_widths_that_fix_them():
    from dbot_ds.teachers.sources import heads_of_width
    assert [heads_of_width(w) for w in (96, 384, 768, 1024, 1280, 1408, 1664)] == [3, 6, 12, 16, 16, 16, 16]
    assert heads_of_width(192) is None and heads_of_width(320) is None      # ambiguous; no known ViT


def test_ambiguous_width_without_metadata_asks_for_num_heads(tmp_path, capsys):
    from safetensors.torch import save_file
    m = sharp_tiny_vit()
    save_file(m.state_dict(), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(ConfigError, match=r"width 192 does not fix it \(vit_small_patch8 has 6, timm's vit_tiny has "
                                          r"3\)\. Set teacher.num_heads.*teacher.arch=vit_small_patch8"):
        vit_teacher(tiny_cfg(tmp_path / "tiny.safetensors"))
    teacher, _ = vit_teacher(tiny_cfg(tmp_path / "tiny.safetensors", "teacher.num_heads=3", "teacher.final_norm=true"))
    assert "width 192, depth 2, 3 heads (teacher.num_heads), patch 4" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m.forward_features(x), atol=1e-5)
        wrong, _ = vit_teacher(tiny_cfg(tmp_path / "tiny.safetensors", "teacher.num_heads=6", "teacher.final_norm=true"))
        assert (wrong(x) - m.forward_features(x)).abs().max() > 0.5          # what the old default (6) did


def test_heads_from_a_dbot_export_json_beside_the_weights(tmp_path, capsys):
    from safetensors.torch import save_file
    m = timm_vit(width=192, heads=3)
    save_file(m.state_dict(), str(tmp_path / "encoder.safetensors"))
    kwargs = dict(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, mlp_ratio=4.0)   # as dbot-export
    (tmp_path / "encoder.json").write_text(json.dumps({"timm_arch": "vit_base_patch16_224", "timm_kwargs": kwargs}))
    teacher, _ = vit_teacher(tiny_cfg(tmp_path / "encoder.safetensors", "teacher.final_norm=true"))
    assert "3 heads (encoder.json beside the weights (timm_arch vit_base_patch16_224))" in capsys.readouterr().out
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m.forward_features(x), atol=1e-5)
    vit_teacher(tiny_cfg(tmp_path / "encoder.safetensors", "teacher.num_heads=3"))          # agreeing: fine
    with pytest.raises(ConfigError, match=r"encoder.json beside the weights .* says 3 heads, but teacher.num_heads "
                                          r"gives 6"):
        vit_teacher(tiny_cfg(tmp_path / "encoder.safetensors", "teacher.num_heads=6"))
    from dbot_ds.config import TeacherConfig
    from dbot_ds.teachers.sources import teacher_heads
    with pytest.raises(ConfigError, match=r"says 3 heads, but teacher.arch=vit_small_patch8 gives 6"):
        teacher_heads(TeacherConfig(arch="vit_small_patch8"), 192, tmp_path / "encoder.safetensors", None)


def test_heads_from_a_timm_hub_config_json(tmp_path, capsys):
    from safetensors.torch import save_file
    save_file(timm_vit(width=192, heads=3).state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224.augreg_in21k",
                                                      "num_classes": 10, "num_features": 192}))
    vit_teacher(tiny_cfg(tmp_path / "model.safetensors"))
    assert "3 heads (config.json beside the weights" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))    # 384 wide
    with pytest.raises(ConfigError, match="describes a 384-wide ViT, but the weights are 192 wide"):
        vit_teacher(tiny_cfg(tmp_path / "model.safetensors"))


def test_heads_from_the_reference_checkpoints_args(tmp_path, capsys):
    import argparse
    m = timm_vit(width=192, heads=3)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("head")}
    state["decoder_embed.weight"] = torch.zeros(32, 192)
    args = argparse.Namespace(model="mae_vit_tiny_patch16_dec512d8b", input_size=224, mask_ratio=0.75, lr=None,
                              output_dir="./out", norm_pix_loss=False)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "args": args},
               tmp_path / "checkpoint-799.pth")
    teacher, _ = vit_teacher(tiny_cfg(tmp_path / "checkpoint-799.pth", "teacher.final_norm=true"))
    assert "3 heads (args.model='mae_vit_tiny_patch16_dec512d8b' in the checkpoint)" in capsys.readouterr().out
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m.forward_features(x), atol=1e-5)
    with pytest.raises(ConfigError, match="args.model='mae_vit_tiny_patch16_dec512d8b' in the checkpoint says 3 heads, "
                                          "but teacher.num_heads gives 6"):
        vit_teacher(tiny_cfg(tmp_path / "checkpoint-799.pth", "teacher.num_heads=6"))


def official_checkpoint(tmp_path, state, extra_object=None):
    """A file as the official dBOT / MAE `misc.save_model` writes it: model, a real AdamW state dict, epoch, the
    GradScaler's state and the argparse args; `extra_object` is smuggled in beside them."""
    import argparse
    params = [torch.nn.Parameter(v.clone()) for v in list(state.values())[:3]]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    sum(p.sum() for p in params).backward()
    opt.step()
    args = argparse.Namespace(model="mae_vit_tiny_patch16_dec512d8b", batch_size=64, epochs=800, accum_iter=1,
                              input_size=224, mask_ratio=0.75, norm_pix_loss=False, weight_decay=0.05, lr=None,
                              blr=1.5e-4, min_lr=0.0, warmup_epochs=40, data_path="/data/in1k", output_dir="./out",
                              device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True,
                              world_size=32, local_rank=-1, dist_on_itp=False, dist_url="env://", distributed=True)
    blob = {"model": state, "optimizer": opt.state_dict(), "epoch": 799, "args": args,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 117}}
    if extra_object is not None:
        blob["extra"] = extra_object
    torch.save(blob, tmp_path / "checkpoint-799.pth")
    return tmp_path / "checkpoint-799.pth"


class _RunsCode:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_official_checkpoint_loads_with_every_encoder_key_and_says_what_it_ignored(tmp_path, capsys):
    m = timm_vit(width=192, heads=3)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("head")}
    state.update({"decoder_embed.weight": torch.zeros(32, 192), "decoder_blocks.0.norm1.weight": torch.ones(32),
                  "mask_token": torch.zeros(1, 1, 32)})
    path = official_checkpoint(tmp_path, state)
    teacher, unused = vit_teacher(tiny_cfg(path, "teacher.final_norm=true"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), m.forward_features(x), atol=1e-5)
    assert not any(k.startswith(("blocks", "patch_embed", "cls_token", "pos_embed")) for k in unused)
    out = capsys.readouterr().out
    assert f"used {len(state) - len(unused)} encoder tensors" in out and len(unused) == 3
    assert "ignored decoder (2 tensors), mask_token (1 tensor); optimizer, epoch, scaler, args" in out


def test_official_checkpoint_with_a_malicious_global_is_refused_without_running_it(tmp_path):
    m = timm_vit(width=192, heads=3)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("head")}
    marker = tmp_path / "ran"
    path = official_checkpoint(tmp_path, state, extra_object=_RunsCode(marker))
    with pytest.raises(ConfigError, match=r"refused by torch's weights-only loader \(it holds the pickle global "
                                          r"posix.system\); nothing in it was run"):
        vit_teacher(tiny_cfg(path))
    assert not marker.exists()
