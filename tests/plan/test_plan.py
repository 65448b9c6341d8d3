"""dbot-plan against hand-computable parts for ViT-H/14 (weights, gradients, optimizer, teacher bytes)."""
import json

import pytest

from dbot_ds.config import load_config
from dbot_ds.plan.memory import GIB, GPUS, cli, max_micro_batch, param_counts, plan

P_STUDENT = 656_968_960        # ViT-H/14 encoder 630.4 M + decoder/predictor (the reference's ~657 M)


@pytest.fixture(scope="module")
def vit_h():
    return load_config(overrides=["schedule.stage_steps=[1]", "model.arch=vit_huge_patch14"]).model


def test_param_counts(vit_h):
    p, pt, block = param_counts(vit_h, 32)
    assert p == P_STUDENT
    assert pt == 630_435_840 - 2 * 1280                    # the encoder without its final LayerNorm
    assert block == 12 * 1280**2 + 13 * 1280                # qkv, proj, fc1, fc2 weights + biases and 2 norms


@pytest.mark.parametrize("zero,world", [(0, 1), (1, 8), (2, 32), (3, 32)])
def test_model_state_bytes_per_zero_stage(vit_h, zero, world):
    m = plan(vit_h, zero=zero, world=world, micro_batch=0, ckpt_every=0, teacher="replicated")
    p = P_STUDENT
    assert m.optimizer == pytest.approx(12 * p / (world if zero >= 1 else 1))      # fp32 master + 2 moments
    if zero < 3:
        assert m.weights == pytest.approx(2 * p)                                    # bf16 weights, whole
    else:
        assert 2 * p / world < m.weights < 2 * p / world + 0.5 * GIB               # a shard + gathered blocks
    if zero < 2:
        assert m.gradients == pytest.approx(2 * p)
    else:
        assert m.gradients == pytest.approx(2 * p / world + 2 * 2e8)               # shard + reduce bucket
    assert m.teacher == pytest.approx(2 * (630_435_840 - 2560))
    assert m.activations == 0


def test_teacher_placement_offload_and_activations(vit_h):
    rep = plan(vit_h, zero=3, world=32, micro_batch=64, ckpt_every=0, teacher="replicated")
    z3 = plan(vit_h, zero=3, world=32, micro_batch=64, ckpt_every=0, teacher="zero3")
    assert z3.teacher < rep.teacher / 10
    off = plan(vit_h, zero=3, world=32, micro_batch=64, ckpt_every=0, teacher="zero3", offload=True)
    assert off.optimizer == 0
    twice = plan(vit_h, zero=3, world=32, micro_batch=128, ckpt_every=0, teacher="zero3")
    assert twice.activations == pytest.approx(2 * z3.activations)
    ckpt = plan(vit_h, zero=3, world=32, micro_batch=64, ckpt_every=1, teacher="zero3")
    assert ckpt.activations < z3.activations / 3


def test_max_micro_batch_is_the_boundary(vit_h):
    kw = dict(zero=2, world=32, ckpt_every=0, teacher="replicated")
    m = max_micro_batch(vit_h, GPUS["A100-80G"], **kw)
    assert m > 128                                           # the reference's 128 per GPU fits on 80 GB
    assert plan(vit_h, micro_batch=m, **kw).total <= GPUS["A100-80G"] * GIB < plan(vit_h, micro_batch=m + 1, **kw).total


def test_cli_json(capsys):
    assert cli(["--arch", "vit_huge_patch14", "--zero", "3", "--world", "32", "--micro-batch", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["gib"]["total"] == pytest.approx(sum(v for k, v in out["gib"].items() if k != "total"), abs=0.05)
    assert set(out["fits"]) == set(GPUS) and out["max_micro_batch"]["H200-141G"] > out["max_micro_batch"]["H100-80G"]


@pytest.mark.parametrize("ckpt", [0, 1])
def test_activation_term_matches_the_bytes_torch_holds(ckpt):
    """dbot-plan's activations per image against torch's MemTracker over a real bf16 student micro-step (the
    tensors, not the allocator). Before the per-phase transient, checkpointed stacks were planned ~2x too high."""
    from dbot_ds.bench.memcheck import check
    r = check("vit_small_patch8", ckpt, batch=2, img_size=64)
    assert abs(r["plan_error"]) < 0.10, r
