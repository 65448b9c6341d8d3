"""python -m dbot_ds.finetune on a tiny random export (our Encoder, written by export's own writer) over synthetic
labelled shards: the export loads into the classifier unchanged, the param groups carry the reference's layer-decay
scales, a few CPU steps train (finite loss, encoder weights move) and save a timm-loadable classifier, 2 ranks run
under torchrun, and bad input fails with the fix in the message."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run, torchrun_cmd

DEPTH, DECAY = 4, 0.65


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A random vit_tiny_patch4 (32 px, width 96, depth 4) as a dbot-export folder (no training run)."""
    from dbot_ds.checkpoint.export import IMAGENET_MEAN, IMAGENET_STD, _write_export, timm_spec, to_timm_state
    from dbot_ds.config import ModelConfig
    from dbot_ds.model.vit import Encoder
    cfg = ModelConfig()
    assert cfg.depth == DEPTH
    torch.manual_seed(0)
    state = to_timm_state(Encoder(cfg, cfg.depth).state_dict(), cfg)
    arch, kwargs = timm_spec(cfg, state, cfg.depth, final_norm=True)
    info = {"timm_arch": arch, "timm_kwargs": kwargs, "model_name": "tiny test encoder", "step": 0,
            "img_size": cfg.img_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    out = tmp_path_factory.mktemp("export")
    _write_export(out, "encoder", state, info)
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    """64 synthetic 32-px images in 2 shards, `cls` 0..9."""
    from dbot_ds.data.manifest import shard_pattern
    from dbot_ds.data.synthetic import write_synthetic_shards
    out = tmp_path_factory.mktemp("labelled")
    write_synthetic_shards(out, 64, img_size=32, per_shard=32, seed=0)
    return shard_pattern(out)


def export_state(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(export / "encoder.safetensors"))


def smoke_args(export: Path, pattern: str, *extra) -> list[str]:
    # 64 images / batch 8 = 8 steps per epoch; warmup 0.25 epoch = 2 steps, so step 0 runs at LR 0.
    return [str(export), "--train-shards", pattern, "--num-classes", "10", "--batch", "8", "--epochs", "1",
            "--warmup-epochs", "0.25", "--workers", "0", "--shuffle-buffer", "16", "--log-every", "1",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_holds_the_export_unchanged(tiny_export, pool):
    from dbot_ds.evaluate.finetune import build_model
    model, _ = build_model(str(tiny_export), 10, global_pool=pool)
    got, want = model.state_dict(), export_state(tiny_export)
    # avg (the reference): the export's final norm is replaced by a fresh fc_norm after pooling.
    kept = [k for k in want if pool == "token" or not k.startswith("norm.")]
    assert len(kept) == len(want) - (2 if pool == "avg" else 0)
    for k in kept:
        assert torch.equal(got[k], want[k]), k
    assert isinstance(model.norm, torch.nn.Identity) == (pool == "avg")
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) == (pool == "avg")
    assert model.head.weight.shape == (10, 96) and torch.all(model.head.bias == 0)
    assert 0 < model.head.weight.std() < 0.02                        # trunc-normal std 0.01, as the reference
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_param_groups_carry_the_layer_decay_scales(tiny_export):
    from dbot_ds.evaluate.finetune import build_model, build_optimizer, set_lr
    model, _ = build_model(str(tiny_export), 10)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=DECAY)
    names = {id(p): n for n, p in model.named_parameters()}
    group = {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}
    assert set(group) == set(names.values())                         # every parameter is optimised
    scale = {n: g["lr_scale"] for n, g in group.items()}
    # BEiT/MAE layer ids: embeddings 0, block i -> i + 1, the rest (fc_norm, head) depth + 1; scale decay^(depth+1-id).
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    for i in range(DEPTH):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(DECAY ** (DEPTH - i))
    assert scale[f"blocks.{DEPTH - 1}.mlp.fc2.bias"] == pytest.approx(DECAY)  # the last block: decay^1
    for n in ("patch_embed.proj.weight", "cls_token", "pos_embed"):
        assert scale[n] == pytest.approx(DECAY ** (DEPTH + 1)), n
    # No weight decay on 1-D parameters, cls_token and pos_embed (the reference's no_weight_decay list).
    decay = {n: g["weight_decay"] for n, g in group.items()}
    assert decay["head.weight"] == decay["blocks.0.attn.qkv.weight"] == decay["patch_embed.proj.weight"] == 0.05
    assert decay["cls_token"] == decay["pos_embed"] == decay["blocks.0.norm1.weight"] == decay["head.bias"] == 0.0
    set_lr(optimizer, 2e-3)
    assert all(g["lr"] == pytest.approx(2e-3 * g["lr_scale"]) for g in optimizer.param_groups)


def test_randaug_top_magnitude_posterize_gives_black_instead_of_crashing():
    """timm's RandAug `inc1` asks for 0-bit posterize at magnitude 10 (about 1 image in 650 at m9-mstd0.5); the
    reference's Pillow returned black, newer Pillow raises, which would end a fine-tune at a random image."""
    import numpy as np
    from PIL import Image

    from dbot_ds.evaluate.finetune import parse_args, train_transform
    transform = train_transform(parse_args(["x", "--train-shards", "y"]), dict(interpolation="bicubic"), 32)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    op = next(op for op in ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0                # the top magnitude, every time
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0
    assert transform(img).shape == (3, 32, 32)


def test_a_few_cpu_steps_train_and_save_a_timm_classifier(tiny_export, labelled, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    from dbot_ds.evaluate.finetune import parse_args, train
    from dbot_ds.plan.stages import lr_at
    out = tmp_path / "ft"
    record = train(parse_args(smoke_args(tiny_export, labelled, "--max-steps", "3", "--val-shards", labelled,
                                         "--out", str(out))))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[-1] == record
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in lines)
    peak = 3e-4 * 8 / 256                                            # blr x global batch / 256
    assert [r["lr"] for r in lines] == [lr_at(s, peak=peak, min_lr=1e-6, warmup_steps=2, stage_steps=8)
                                        for s in range(3)]
    assert 0.0 <= record["val_acc1"] <= 100.0

    saved, before = load_file(str(out / "model.safetensors")), export_state(tiny_export)
    moved = [k for k in before if k.startswith(("blocks.", "patch_embed.")) and not torch.equal(saved[k], before[k])]
    assert len(moved) == len([k for k in before if k.startswith(("blocks.", "patch_embed."))])   # every one moved
    info = json.loads((out / "model.json").read_text())
    assert info["timm_kwargs"]["num_classes"] == 10 and info["step"] == 3
    model = timm.create_model(info["timm_arch"], pretrained=False, **info["timm_kwargs"])
    model.load_state_dict(saved, strict=True)                        # the hand-off loads with timm alone


@pytest.mark.slow
def test_two_ranks_under_torchrun(tiny_export, labelled, tmp_path):
    proc = run(torchrun_cmd(2) + ["-m", "dbot_ds.finetune"] + smoke_args(tiny_export, labelled, "--max-steps", "2",
                                                                        "--batch", "4", "--val-shards", labelled))
    assert proc.returncode == 0, proc.tail
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["step"] for r in lines] == [1, 2]                      # rank 0 alone logs
    assert lines[-1]["lr"] == pytest.approx(3e-4 * 8 / 256 / 2)      # global batch 2 ranks x 4 = 8
    assert all(math.isfinite(r["train_loss"]) for r in lines) and 0 <= lines[-1]["val_acc1"] <= 100


def test_bad_input_names_the_fix(tiny_export, labelled, tmp_path):
    from dbot_ds.evaluate.finetune import parse_args, train
    with pytest.raises(SystemExit):                                  # argparse: odd batch with Mixup
        parse_args(smoke_args(tiny_export, labelled, "--batch", "7"))
    with pytest.raises(ValueError, match="fewer images than one global batch .*lower --batch"):
        train(parse_args(smoke_args(tiny_export, labelled, "--batch", "128")))
    with pytest.raises(FileNotFoundError, match="dbot-export"):
        train(parse_args(smoke_args(tmp_path, labelled)))
