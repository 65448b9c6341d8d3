"""The CLIP-teacher recipe (dBOT `beit` branch): block-wise masking, the symmetric student, the negative cosine
loss, CLIP targets after ln_post + projection, the teacher's input size, the presets, and a 2-process ZeRO-3 run."""
import math
import random

import numpy as np
import pytest
import torch
from conftest import TINY, launch_pretrain, read_metrics

from dbot_ds.config import ConfigError, load_config
from dbot_ds.model.masking import block_mask_2d, block_masking
from dbot_ds.model.objective import dbot_loss, loss_fn, neg_cosine_loss
from dbot_ds.model.vit import SymmetricStudent, build_student, param_groups
from dbot_ds.plan.stages import peak_lr
from dbot_ds.teachers.clip import clip_grid_check, clip_teacher

CLIP_ARGS = ["teacher.source=hf_clip", "teacher.weights=/nowhere", "schedule.stage_steps=[2]"]
SYM = CLIP_ARGS + ["model.student=symmetric", "model.mask=block", "model.num_mask_patches=25",
                   "model.min_mask_patches_per_block=4", "objective.loss=neg_cosine"]


# ------------------------------------------------------------------------------------------- block masking

def reference_block_mask(rng, h, w, n, min_p=16, min_aspect=0.3):
    """The reference generator (BEiT v1's MaskingGenerator, as dBOT's beit branch uses it), written out again over a
    numpy grid: blocks until n patches are hidden, or until ten draws in a row add nothing."""
    la = (math.log(min_aspect), math.log(1 / min_aspect))
    m = np.zeros((h, w), dtype=np.int64)
    count = 0
    while count < n:
        budget, delta = n - count, 0
        for _ in range(10):
            area = rng.uniform(min_p, budget)
            ar = math.exp(rng.uniform(*la))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                if 0 < bh * bw - m[top:top + bh, left:left + bw].sum() <= budget:
                    delta = int(bh * bw - m[top:top + bh, left:left + bw].sum())
                    m[top:top + bh, left:left + bw] = 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return m.astype(bool)


def components(mask: np.ndarray) -> int:
    """4-connected groups of hidden patches."""
    seen, n = np.zeros_like(mask), 0
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        n += 1
        stack = [(i, j)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return n


def test_block_mask_count_and_shape_match_the_reference_generator():
    rng_ref, n_img = random.Random(0), 3000
    ref = [reference_block_mask(rng_ref, 14, 14, 78) for _ in range(n_img)]
    torch.manual_seed(0)
    ours = block_masking(n_img, 14, 78).view(n_img, 14, 14).numpy()
    ref_counts, our_counts = np.array([m.sum() for m in ref]), ours.sum(axis=(1, 2))
    assert our_counts.max() == 78 and ref_counts.max() == 78           # never more than asked
    # The reference stops short when ten draws in a row find no block that fits: about 30% of images.
    assert abs((our_counts == 78).mean() - (ref_counts == 78).mean()) < 0.04
    assert 0.6 < (our_counts == 78).mean() < 0.8 and abs(our_counts.mean() - ref_counts.mean()) < 0.15
    # Blocks, not scattered patches: few connected groups, distributed as the reference's; a random mask of 78
    # patches has many.
    ours_cc = np.array([components(m) for m in ours[:600]])
    ref_cc = np.array([components(m) for m in ref[:600]])
    assert abs(ours_cc.mean() - ref_cc.mean()) < 0.25 and ours_cc.mean() < 4
    rand = torch.rand(200, 196).argsort(1).argsort(1).lt(78).view(200, 14, 14).numpy()
    assert np.mean([components(m) for m in rand]) > 15


def test_block_mask_is_a_union_of_rectangles_and_reproducible():
    rng = random.Random(3)
    for _ in range(200):
        m = np.array(block_mask_2d(rng, 14, 14, 78))
        # every hidden patch lies in a fully hidden 2x2 square or in a hidden row/column run of >= 2, unless
        # it is one of the rare 1-patch top-ups at the end
        lone = sum(1 for i, j in zip(*np.nonzero(m))
                   if not any(0 <= i + a < 14 and 0 <= j + b < 14 and m[i + a, j + b]
                              for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1))))
        assert lone <= 2
    torch.manual_seed(7)
    a = block_masking(4, 14, 78)
    torch.manual_seed(7)
    assert torch.equal(a, block_masking(4, 14, 78))
    assert not torch.equal(a, block_masking(4, 14, 78))


# ------------------------------------------------------------------------------------------- the loss

def test_neg_cosine_equals_the_reference_formula():
    torch.manual_seed(0)
    b, n, d = 3, 16, 8
    pred, target = torch.randn(b, 1 + n, d), torch.randn(b, 1 + n, d) * 3 + 1
    hidden = torch.rand(b, n) < 0.4                       # a different count per image
    mask = torch.cat([torch.zeros(b, 1), hidden.float()], dim=1)
    # Reference: the teacher's patch tokens (cls discarded) and the student's outputs at the hidden positions,
    # flattened over the batch; loss = 1 - mean cosine.
    out, lab = pred[:, 1:][hidden], target[:, 1:][hidden]
    cos = (out * lab).sum(-1) / (out.norm(dim=-1) * lab.norm(dim=-1))
    want = 1 - cos.mean()
    assert torch.allclose(neg_cosine_loss(pred, target, mask), want, atol=1e-6)
    # Scale of prediction or target does not matter; the target is not standardised
    assert torch.allclose(neg_cosine_loss(5 * pred, target, mask), want, atol=1e-6)
    cfg = load_config(overrides=SYM)
    assert loss_fn(cfg) is neg_cosine_loss and loss_fn(load_config(overrides=["schedule.stage_steps=[2]"])) is dbot_loss


# ------------------------------------------------------------------------------------------- the student

def test_symmetric_student_contract_and_reference_structure():
    import timm
    cfg = load_config(overrides=SYM + ["model.drop_path=0.1"])
    s = build_student(cfg.model, teacher_dim=24, seed=0)
    assert isinstance(s, SymmetricStudent)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    pred, mask = s(x)
    assert pred.shape == (4, 65, 24) and mask.shape == (4, 65)
    assert (mask[:, 0] == 0).all() and (mask[:, 1:].sum(1) <= 25).all() and (mask[:, 1:].sum(1) > 15).all()
    # hidden patches are replaced by the mask token: their pixels do not reach the output
    s.eval()
    hidden = torch.zeros(2, 64, dtype=torch.bool)
    hidden[:, :20] = True
    y = x[:2].clone()
    y[:, :, :8, :] += 5.0           # rows 0-1 of the 8x8 grid = patches 0-15, all hidden
    with torch.no_grad():
        assert torch.allclose(s(x[:2], hidden)[0], s(y, hidden)[0], atol=1e-5)
    # The reference's structure: layer scale 0.1, zero q/v biases, no k bias, zero relative position table; the
    # encoder is timm's Beit (shared relative position bias, no absolute positions) under the same names.
    blk = s.encoder.blocks[1]
    assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.attn.q_bias == 0) and torch.all(blk.attn.k_bias == 0)
    assert not hasattr(s.encoder, "pos_embed") and torch.all(s.encoder.rel_pos_bias.relative_position_bias_table == 0)
    assert s.encoder.blocks[0].attn.qkv.weight.abs().max() <= 0.02 + 1e-7            # truncated at one std
    timm_beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                                  embed_dim=96, depth=4, num_heads=3, use_abs_pos_emb=False, use_rel_pos_bias=False,
                                  use_shared_rel_pos_bias=True, init_values=0.1, global_pool="token").eval()
    timm_beit.load_state_dict(s.encoder.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(timm_beit.forward_features(x), s.encoder(x), atol=1e-5)
    # Weight decay as the reference: none on cls (no_weight_decay) nor 1-D params; the mask token is decayed.
    names = {id(p): n for n, p in s.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(s, 0.05))
    assert "encoder.cls_token" in no_decay and "mask_token" in decay and "encoder.blocks.0.gamma_1" in no_decay
    assert "encoder.rel_pos_bias.relative_position_bias_table" in decay


def test_symmetric_student_recompute_gives_the_same_gradients():
    grads = []
    for every in (0, 1):
        cfg = load_config(overrides=SYM + ["model.drop_path=0.2", f"model.act_ckpt_every={every}"])
        s = build_student(cfg.model, teacher_dim=24, seed=0).train()
        torch.manual_seed(5)
        pred, mask = s(torch.randn(2, 3, 32, 32))
        neg_cosine_loss(pred, torch.ones_like(pred), mask).backward()
        grads.append(s.encoder.blocks[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_config_refuses_combinations_that_are_not_built():
    with pytest.raises(ConfigError, match="model.mask=block needs model.student=symmetric"):
        load_config(overrides=CLIP_ARGS + ["model.mask=block", "model.num_mask_patches=20"])
    with pytest.raises(ConfigError, match="num_mask_patches in 1..63"):
        load_config(overrides=CLIP_ARGS + ["model.student=symmetric", "model.mask=block"])
    with pytest.raises(ConfigError, match="symmetric is the pre-trained-teacher recipe"):
        load_config(overrides=["schedule.stage_steps=[2]", "model.student=symmetric"])
    with pytest.raises(ConfigError, match="objective.loss must be one of smooth_l1, neg_cosine"):
        load_config(overrides=["schedule.stage_steps=[2]", "objective.loss=cosine"])
    with pytest.raises(ConfigError, match="teacher.input_size applies to teachers from other weights"):
        load_config(overrides=["schedule.stage_steps=[2]", "teacher.input_size=196"])
    with pytest.raises(ConfigError, match="teacher.clip_target applies to teacher.source=hf_clip only"):
        load_config(overrides=["schedule.stage_steps=[2]", "teacher.clip_target=post_norm_proj"])


# ------------------------------------------------------------------------------------------- CLIP targets

def with_weights(folder, *extra):
    """SYM with teacher.weights pointing at `folder` (the key given once)."""
    return [o for o in SYM if not o.startswith("teacher.weights=")] + [f"teacher.weights={folder}", *extra]


def save_clip(folder, image_size=32, patch=4, full=True):
    """A tiny random CLIP saved with save_pretrained: the whole CLIPModel (text tower included), or the vision
    tower alone (no projection)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=48)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=48)).save_pretrained(folder)
    else:
        CLIPVisionModel(vision).save_pretrained(folder)


def to_clip_pixels(x):
    mean_in, std_in = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((x * std_in.view(1, 3, 1, 1) + mean_in.view(1, 3, 1, 1)) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def test_post_norm_proj_target_equals_transformers_ln_post_and_projection(tmp_path):
    from transformers import CLIPVisionModelWithProjection
    save_clip(tmp_path / "clip")
    cfg = load_config(overrides=with_weights(tmp_path / "clip", "teacher.clip_target=post_norm_proj"))
    teacher = clip_teacher(cfg)
    assert teacher.out_dim == 48
    ref = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = teacher(x)
        hidden = ref(pixel_values=to_clip_pixels(x)).last_hidden_state
        want = ref.visual_projection(ref.vision_model.post_layernorm(hidden))      # every token, cls included
    assert got.shape == (2, 65, 48) and torch.allclose(got, want, atol=1e-5)
    save_clip(tmp_path / "tower", full=False)
    with pytest.raises(ConfigError, match="needs CLIP's visual projection"):
        clip_teacher(load_config(overrides=with_weights(tmp_path / "tower", "teacher.clip_target=post_norm_proj")))


def test_teacher_input_size_aligns_a_finer_patch_grid(tmp_path):
    import torch.nn.functional as F
    from transformers import CLIPVisionModelWithProjection
    # A /3 tower trained on a 10x10 grid (30 px), like CLIP-L/14 (16x16 at 224), beside the 8x8 /4 student (32
    # px): it reads the image at 24 px, as CLIP-L/14 reads 196 px beside a /16 student.
    save_clip(tmp_path / "clip", image_size=30, patch=3)
    base = with_weights(tmp_path / "clip", "teacher.clip_target=post_norm_proj")
    teacher = clip_teacher(load_config(overrides=base + ["teacher.input_size=24"]))
    ref = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    table = ref.vision_model.embeddings.position_embedding.weight.detach()
    # the reference's interpolate_pos_encoding: bicubic with scale factor (8 + 0.1) / 10, cls position kept
    patch = F.interpolate(table[1:].reshape(1, 10, 10, 64).permute(0, 3, 1, 2), scale_factor=(0.81, 0.81),
                          mode="bicubic", align_corners=False)
    want_table = torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(64, 64)])
    assert torch.allclose(teacher.tower.embeddings.position_embedding.weight, want_table, atol=1e-6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = teacher(x)
        small = F.interpolate(to_clip_pixels(x), size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
        v = ref.vision_model                     # the tower step by step, with the interpolated table
        patches = v.embeddings.patch_embedding(small).flatten(2).transpose(1, 2)
        tokens = torch.cat([v.embeddings.class_embedding.expand(2, 1, -1), patches], dim=1) + want_table
        hidden = v.encoder(inputs_embeds=v.pre_layrnorm(tokens)).last_hidden_state
        want = ref.visual_projection(v.post_layernorm(hidden))
    assert out.shape == (2, 65, 48) and torch.allclose(out, want, atol=1e-4)
    with pytest.raises(ConfigError, match=r"cannot be aligned\. Set teacher.input_size=24"):
        clip_teacher(load_config(overrides=base))                      # 32 px / 3 is no whole grid
    with pytest.raises(ConfigError, match="9x9 grid.*8x8"):
        clip_teacher(load_config(overrides=base + ["teacher.input_size=27"]))


def test_real_clip_geometries():
    assert clip_grid_check(224, 16, 0, 224, 16) == 14            # CLIP-B/16 -> ViT-B/16
    assert clip_grid_check(224, 14, 196, 224, 16) == 14          # CLIP-L/14 at 196 px -> ViT-L/16
    assert clip_grid_check(224, 14, 0, 224, 14) == 16            # CLIP-L/14 -> ViT-H/14
    with pytest.raises(ConfigError, match="Set teacher.input_size=196"):
        clip_grid_check(224, 14, 0, 224, 16)


@pytest.mark.parametrize("name,arch,input_size,grid", [("vit_b_clip", "vit_base_patch16", 0, 14),
                                                       ("vit_l_clip", "vit_large_patch16", 196, 14),
                                                       ("vit_h_clip", "vit_huge_patch14", 0, 16)])
def test_presets_mirror_the_reference_commands(name, arch, input_size, grid):
    cfg = load_config(preset=name)
    m, t, o, s = cfg.model, cfg.teacher, cfg.optim, cfg.schedule
    assert (m.arch, m.student, m.mask, m.num_mask_patches, m.min_mask_patches_per_block) == (
        arch, "symmetric", "block", 78, 16)
    assert (m.drop_path, m.layer_scale_init, cfg.objective.loss) == (0.1, 0.1, "neg_cosine")
    assert (t.source, t.clip_target, t.input_size) == ("hf_clip", "post_norm_proj", input_size)
    assert s.stage_epochs == [1600] and s.warmup_epochs == 10
    assert o.global_batch == 4096 and math.isclose(peak_lr(o.blr, o.global_batch), 3e-3)
    assert (o.min_lr, o.beta1, o.beta2, o.eps, o.clip_grad, o.weight_decay) == (1e-5, 0.9, 0.98, 1e-6, 3.0, 0.05)
    assert m.img_size // m.patch_size == grid
    clip_patch = 16 if name == "vit_b_clip" else 14
    assert clip_grid_check(224, clip_patch, input_size, m.img_size, m.patch_size) == grid


# ------------------------------------------------------------------------------------------- 2 processes

@pytest.mark.slow
def test_symmetric_student_trains_under_zero3_on_two_processes(tmp_path, shards):
    save_clip(tmp_path / "clip", image_size=30, patch=3)
    out = tmp_path / "run"
    launch_pretrain(2, TINY + [
        f"data.shards={shards}", f"run.out_dir={out}", "schedule.stage_steps=[4]", "schedule.warmup_steps=1",
        "run.log_every=1", "deepspeed.config=zero3", "model.student=symmetric", "model.mask=block",
        "model.num_mask_patches=25", "model.min_mask_patches_per_block=4", "model.act_ckpt_every=1",
        "objective.loss=neg_cosine", "teacher.source=hf_clip", f"teacher.weights={tmp_path / 'clip'}",
        "teacher.clip_target=post_norm_proj", "teacher.input_size=24", "optim.eps=1e-6"])
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 4 and all(0.0 < x < 2.0 for x in losses), losses
