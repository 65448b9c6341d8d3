"""Teachers from other projects' weights: timm safetensors, the reference MAE/dBOT format, a transformers CLIP
vision tower (in-process, and for a few steps under the deepspeed launcher with 2 processes)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, deepspeed_cmd, run
from dbot_ds.config import ConfigError, load_config
from dbot_ds.teacher_sources import clip_teacher, vit_teacher

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
    with pytest.raises(ConfigError, match="patch_size: checkpoint 8, expected 4"):
        vit_teacher(cfg_for(tmp_path / "p8.safetensors"))
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


def clip_reference(model, images_imagenet_normalised, layer=-1):
    """What transformers computes for the same images (CLIP's own normalisation)."""
    mean_in, std_in = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    raw = images_imagenet_normalised * std_in.view(1, 3, 1, 1) + mean_in.view(1, 3, 1, 1)
    out = model(pixel_values=(raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), output_hidden_states=True)
    return out.last_hidden_state if layer < 0 else out.hidden_states[layer]


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


def test_clip_teacher_under_deepspeed_two_processes(tmp_path, shards):
    save_clip(tmp_path / "clip")
    out = tmp_path / "probe"
    proc = run(deepspeed_cmd(2) + ["tests/teacher_probe.py", str(out)] + TINY + [
        f"data.shards={shards}", f"run.out_dir={tmp_path / 'run'}", "schedule.stage_steps=[3]",
        "schedule.warmup_steps=1", "run.log_every=1", "teacher.source=hf_clip", f"teacher.weights={tmp_path / 'clip'}"])
    assert proc.returncode == 0, proc.tail
    for rank in (0, 1):
        r = json.loads((tmp_path / f"probe.rank{rank}.json").read_text())
        assert r["target_shape"] == [8, 65, 64] and r["predictor_out"] == 64     # the predictor follows CLIP's width
        assert r["max_abs_diff"] <= 0.05 * r["target_std"]                       # bf16 teacher vs fp32 transformers
        assert r["losses"] and all(l == l for l in r["losses"])


def test_heads_default_to_the_named_architecture_of_that_width():
    from dbot_ds.teacher_sources import _default_heads
    assert (_default_heads(768), _default_heads(1024), _default_heads(1280), _default_heads(320)) == (12, 16, 16, 5)
