"""Model pieces without DeepSpeed: masking, shapes, activation checkpointing, init, decay groups, sizes."""
from __future__ import annotations

import math

import pytest
import torch

from dbot_ds.config import ARCHS, load_config
from dbot_ds.model.vit import Student, build_student, build_teacher, param_groups, random_masking, sincos_pos_embed_2d


def tiny(**kw):
    return load_config(overrides=["schedule.stage_steps=[1]"] + [f"model.{k}={v}" for k, v in kw.items()]).model


def test_masking_keeps_quarter_and_unshuffle_round_trips():
    torch.manual_seed(0)
    x = torch.randn(3, 64, 5)
    visible, mask, ids_restore = random_masking(x, 0.75)
    assert visible.shape == (3, 16, 5)
    assert mask.sum(1).tolist() == [48, 48, 48]
    # Re-insert the hidden tokens (as the decoder does) and unshuffle: the original order comes back.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    hidden = torch.gather(x, 1, ids_shuffle[:, 16:, None].expand(-1, -1, 5))
    restored = torch.gather(torch.cat([visible, hidden], 1), 1, ids_restore[..., None].expand(-1, -1, 5))
    assert torch.equal(restored, x)
    # The visible tokens are exactly those with mask 0, and masks differ per sample.
    for b in range(3):
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept, 0).values, torch.sort(visible[b], 0).values)
    assert not torch.equal(mask[0], mask[1])


def test_sincos_matches_formula():
    pe = sincos_pos_embed_2d(8, 3)                       # dim 8: 2 frequencies per axis, sin then cos
    assert pe.shape == (10, 8) and torch.all(pe[0] == 0)
    row, col = divmod(5, 3)                              # token 5 (after cls) sits at row 1, column 2
    omega = torch.tensor([1.0, 1 / 100])
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    assert torch.allclose(pe[1 + 5], expect, atol=1e-6)


def test_student_and_teacher_shapes():
    cfg = tiny()
    s = build_student(cfg, seed=0)
    pred, mask = s(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 65, 96) and mask.shape == (2, 65)
    assert torch.all(mask[:, 0] == 1) and mask.sum().item() == 2 * (1 + 48)    # cls counts as masked
    for depth in (0, 2):
        t = build_teacher(cfg, depth, final_norm=False)
        out = t(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 65, 96) and not t.training
        assert all(not p.requires_grad for p in t.parameters())
    with pytest.raises(ValueError, match="model.img_size"):
        s(torch.randn(2, 3, 48, 48))


def test_teacher_keys_are_student_encoder_keys():
    cfg = tiny()
    s = build_student(cfg, seed=0)
    t = build_teacher(cfg, 2, final_norm=True)
    assert set(t.state_dict()) <= set(s.encoder.state_dict())
    assert "blocks.1.attn.qkv.weight" in t.state_dict() and "blocks.2.attn.qkv.weight" not in t.state_dict()


def test_depth0_teacher_is_patch_embedding_plus_positions():
    cfg = tiny()
    t = build_teacher(cfg, 0, final_norm=False)
    x = torch.randn(1, 3, 32, 32)
    out = t(x)
    patches = t.patch_embed(x) + t.pos_embed[:, 1:]
    assert torch.allclose(out[:, 1:], patches) and torch.allclose(out[:, 0], t.cls_token[:, 0])


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_same_loss_and_grads(every):
    from dbot_ds.model.objective import dbot_loss
    x, target = torch.randn(2, 3, 32, 32), torch.randn(2, 65, 96)
    results = []
    for ck in (0, every):
        s = build_student(tiny(act_ckpt_every=ck, drop_path=0.1), seed=0).train()
        torch.manual_seed(7)
        pred, mask = s(x)
        loss = dbot_loss(pred, target, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in s.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


def test_init_statistics_and_seeded_init():
    a, b = build_student(tiny(), seed=3), build_student(tiny(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    w = a.encoder.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() / math.sqrt(2 / sum(w.shape)) - 1) < 0.05
    assert abs(a.encoder.cls_token.std().item() - 0.02) < 0.01 and torch.all(a.encoder.blocks[0].norm1.weight == 1)


def test_weight_decay_groups_follow_reference():
    s = build_student(tiny(), seed=0)
    decay, no_decay = param_groups(s, 0.05)
    names = {id(p): n for n, p in s.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" in decayed and "mask_token" in decayed
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    assert all(n.endswith(".bias") or s.get_parameter(n).ndim == 1 for n in (names[id(p)] for p in no_decay["params"]))
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(s.parameters()))


# Encoder parameters of the reference table (timm counting, incl. the fixed position embedding), within 1%.
@pytest.mark.parametrize("arch,millions", [("vit_base_patch16", 86.6), ("vit_large_patch16", 304.3),
                                           ("vit_huge_patch14", 630.8), ("vit_giant_patch14", 1011),
                                           ("vit_gigantic_patch14", 1843)])
def test_architecture_sizes(arch, millions):
    cfg = load_config(overrides=["schedule.stage_steps=[1]", f"model.arch={arch}"]).model
    with torch.device("meta"):
        s = Student(cfg)
    enc = sum(p.numel() for p in s.encoder.parameters()) + s.encoder.pos_embed.numel()
    assert abs(enc / 1e6 / millions - 1) < 0.01
    assert ARCHS[arch]["decoder_embed_dim"] == 512 and ARCHS[arch]["decoder_depth"] == 8


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_grads():
    from dbot_ds.model.objective import dbot_loss
    x, target = torch.randn(2, 3, 32, 32), torch.randn(2, 65, 96)
    out = []
    for compile_ in (False, True):
        s = build_student(tiny(compile=compile_, act_ckpt_every=2), seed=0).train()
        torch.manual_seed(7)
        pred, mask = s(x)
        loss = dbot_loss(pred, target, mask)
        loss.backward()
        out.append((loss.detach(), s.encoder.blocks[0].attn.qkv.weight.grad.clone()))
        compiled = getattr(s.encoder.blocks[0], "_compiled_call_impl", None) is not None
        assert compiled == compile_ and (getattr(s.decoder_blocks[0], "_compiled_call_impl", None) is not None) == compile_
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-4)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-3, atol=1e-6)
