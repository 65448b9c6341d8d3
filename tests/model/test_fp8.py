"""FP8 teacher forward (dbot_ds.model.fp8) and its benchmark (dbot_ds.bench.fp8), on the CPU (torch's reference FP8 matmul)."""
from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.bench import fp8 as bench_fp8
from dbot_ds.config import load_config
from dbot_ds.data.augment import normalize
from dbot_ds.model.fp8 import E4M3_MAX, Fp8Error, Fp8Linear, check_supported, supported, to_fp8
from dbot_ds.model.vit import Encoder, build_student, build_teacher

TINY = ["schedule.stage_steps=[1]", "model.arch=vit_tiny_patch4"]     # width 96, mlp 384, qkv 288: all /16


def _cfg(*extra: str):
    return load_config(overrides=TINY + list(extra))


def _linear(k: int, n: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(torch.bfloat16)
    with torch.no_grad():
        lin.bias.normal_(0, 0.1)
    return lin


def _teacher(cfg, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return build_teacher(cfg.model, cfg.model.depth, final_norm=False).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Fp8Linear


def test_fp8_linear_matches_bf16_linear():
    lin = _linear(256, 128)
    f = Fp8Linear.from_linear(lin)
    x = torch.randn(64, 256).to(torch.bfloat16)
    ref, out = lin(x).float(), f(x)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 128)
    # e4m3 keeps 3 mantissa bits: each product is off by ~2-3% (rms), so a single layer's rows keep a cosine of
    # ~0.9993 to bf16, never the 0.99999+ that an unquantised path would show.
    cos = F.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.mean() > 0.999 and cos.min() > 0.998
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.999
    assert cos.mean() < 0.99999                                   # it really is quantised
    # leading dims are kept: [B, L, in] -> [B, L, out]
    assert torch.equal(f(x.view(4, 16, 256)), out.view(4, 16, 128))
    # buffers only: nothing to train, nothing for an optimizer to find
    assert list(f.parameters()) == []
    assert {k: v.dtype for k, v in f.named_buffers()} == {
        "weight_fp8": torch.float8_e4m3fn, "weight_scale": torch.float32, "bias": torch.bfloat16}


def test_quantized_weight_dequantizes_to_the_weight_within_e4m3_precision():
    lin = _linear(96, 288, seed=1)
    f = Fp8Linear.from_linear(lin)
    w, deq = lin.weight.float(), f.dequantized_weight()
    scale = f.weight_scale.t()                                          # [out, 1]
    assert f.weight_scale.shape == (1, 288)
    # each row's amax maps to the largest e4m3 value
    assert torch.equal(f.weight_fp8.float().abs().amax(dim=1), torch.full((288,), E4M3_MAX))
    # round-to-nearest with 3 mantissa bits: |error| <= 2^-4 |w| for normal fp8 numbers (|w| / scale >= 2^-6),
    # <= half the smallest subnormal step (2^-10 scale) below that
    err = (deq - w).abs()
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert (err <= bound).all()
    assert err.max() > 0                                                # not a copy: it was quantised
    assert (err / w.abs().clamp_min(1e-30))[w.abs() > scale * 2**-6].mean() > 0.01


def test_outlier_rows_do_not_cost_the_other_rows_precision():
    lin = _linear(256, 128, seed=2)
    f = Fp8Linear.from_linear(lin)
    torch.manual_seed(3)
    x = torch.randn(32, 256).to(torch.bfloat16)
    base = f(x)
    for factor in (1e3, 1e5):
        loud = x.clone()
        loud[5] *= factor                                 # one token far louder than the others
        out, ref = f(loud).float(), lin(loud).float()
        others = torch.cat([torch.arange(5), torch.arange(6, 32)])
        # per-token scales: the other tokens are quantised exactly as without the outlier
        assert torch.equal(f(loud)[others], base[others])
        cos = F.cosine_similarity(out, ref, dim=-1)
        assert cos[others].mean() > 0.999 and cos[others].min() > 0.998 and cos[5] > 0.998

    # what a single tensor-wise scale would do at 1e5: the quiet tokens fall into e4m3's subnormals
    loud = x.clone()
    loud[5] *= 1e5
    sx, sw = loud.float().abs().max() / E4M3_MAX, lin.weight.float().abs().max() / E4M3_MAX
    # (the FP8 product written out in fp32: oneDNN has no tensor-wise-scaled FP8 matmul on some CPUs, e.g. a Xeon
    # capped at AVX2, and the quantisation is the subject here, not the kernel)
    q8 = lambda t, s: (t.float() / s).to(torch.float8_e4m3fn).float()      # noqa: E731
    tw = (q8(loud, sx) @ q8(lin.weight, sw).t() * (sx * sw) + lin.bias.float()).to(torch.bfloat16)
    assert F.cosine_similarity(tw.float(), lin(loud).float(), dim=-1)[:5].min() < 0.99

    # a weight row 1e5 x larger: per-output-row weight scales keep the other outputs exact to the same quantisation
    big = copy.deepcopy(lin)
    with torch.no_grad():
        big.weight[7] *= 1e5
    fb = Fp8Linear.from_linear(big)
    cols = torch.cat([torch.arange(7), torch.arange(8, 128)])
    assert torch.equal(fb(x)[:, cols], base[:, cols])


def test_zero_rows_give_no_nan():
    lin = _linear(32, 48, seed=4)
    with torch.no_grad():
        lin.weight[3] = 0
    f = Fp8Linear.from_linear(lin)
    x = torch.randn(8, 32).to(torch.bfloat16)
    x[2] = 0
    out = f(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 3], lin.bias[3].expand(8))              # zero weight row: the bias
    assert torch.equal(out[2], lin.bias)                               # zero token: the bias


def test_dtype_casts_of_the_module_keep_fp8_storage():
    f = Fp8Linear.from_linear(_linear(64, 64))
    w8, scale = f.weight_fp8.clone(), f.weight_scale.clone()
    x = torch.randn(4, 64).to(torch.bfloat16)
    before = f(x)
    for cast in (lambda m: m.float(), lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu")):
        cast(f)
        assert f.weight_fp8.dtype == torch.float8_e4m3fn and f.weight_scale.dtype == torch.float32
        assert f.bias.dtype == torch.bfloat16
        assert torch.equal(f.weight_fp8.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(f.weight_scale, scale)
    assert torch.equal(f(x), before)


def test_failed_compile_of_the_quantisation_falls_back_to_eager(monkeypatch):
    from dbot_ds.model import fp8

    calls = []

    def broken(fn, **kw):
        def run(*a):
            calls.append(1)
            raise RuntimeError("no triton here\nmore detail")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fp8, "_compiled_quantize", None)
    monkeypatch.setattr(fp8, "fused_quant_error", None)
    x = torch.randn(16, 64).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="no triton here"):
        x8, scale = fp8._fused_quantize(x)
    ref8, ref_scale = fp8.quantize_rows(x)
    assert torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8)) and torch.equal(scale, ref_scale)
    assert fp8.fused_quant_error == "RuntimeError: no triton here"
    fp8._fused_quantize(x)
    assert calls == [1]                                                # eager from then on: no second attempt


# ----------------------------------------------------------------------------------------------------------
# to_fp8


def _kinds(module: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in module.named_modules()}


def test_to_fp8_converts_exactly_the_block_linears():
    cfg = _cfg()
    teacher = _teacher(cfg)
    assert to_fp8(teacher) == 4 * cfg.model.depth == 16              # qkv, proj, fc1, fc2 per block
    kinds = _kinds(teacher)
    for i in range(cfg.model.depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert kinds[f"blocks.{i}.{name}"] == "Fp8Linear"
        assert kinds[f"blocks.{i}.norm1"] == kinds[f"blocks.{i}.norm2"] == "LayerNorm"
    assert kinds["patch_embed.proj"] == "Conv2d"
    assert not any(v == "Linear" for v in kinds.values())
    # what is left trainable-looking is exactly the bf16 part: patch embedding, cls token, block norms
    names = {n for n, _ in teacher.named_parameters()}
    assert all(n.startswith(("patch_embed.", "cls_token")) or ".norm" in n for n in names), names

    # only the named layers (the MLP here)
    mlp_only = _teacher(cfg)
    assert to_fp8(mlp_only, layers=("fc1", "fc2")) == 2 * cfg.model.depth
    kinds = _kinds(mlp_only)
    assert kinds["blocks.3.mlp.fc2"] == "Fp8Linear" and kinds["blocks.3.attn.qkv"] == kinds["blocks.3.attn.proj"] == "Linear"
    with pytest.raises(Fp8Error):
        to_fp8(_teacher(cfg), layers=("nonexistent",))

    # a whole student: encoder and decoder blocks convert, decoder_embed / predictor (outside blocks) do not
    student = build_student(cfg.model, seed=0).to(torch.bfloat16)
    assert to_fp8(student) == 4 * (cfg.model.depth + cfg.model.decoder_depth)
    assert type(student.decoder_embed) is nn.Linear and type(student.predictor) is nn.Linear
    assert type(student.encoder.patch_embed.proj) is nn.Conv2d


def test_to_fp8_leaves_misaligned_layers_in_bf16():
    cfg = _cfg("model.mlp_ratio=4.25")                                # hidden 408: not a multiple of 16
    teacher = _teacher(cfg)
    assert to_fp8(teacher) == 2 * cfg.model.depth                     # qkv and proj only
    kinds = _kinds(teacher)
    assert kinds["blocks.0.mlp.fc1"] == kinds["blocks.0.mlp.fc2"] == "Linear"
    assert kinds["blocks.0.attn.qkv"] == "Fp8Linear"
    x = normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.bfloat16)
    assert torch.isfinite(teacher(x).float()).all()


def test_to_fp8_refuses_when_nothing_converts():
    cfg = _cfg("model.embed_dim=72")                                  # every dim a multiple of 8, not 16
    teacher = _teacher(cfg)
    with pytest.raises(Fp8Error, match="multiples of 16"):
        to_fp8(teacher)
    with pytest.raises(Fp8Error, match="no transformer blocks"):
        to_fp8(nn.Sequential(nn.Linear(32, 32)))


def test_to_fp8_beit_blocks_keep_their_qv_biases():
    cfg = _cfg("model.student=symmetric", "teacher.source=vit", "teacher.weights=unused")
    model = build_student(cfg.model, seed=0).to(torch.bfloat16).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for blk in model.encoder.blocks:           # BEiT's q/v biases start at zero: make them matter
            blk.attn.q_bias.normal_(0, 1.0)
            blk.attn.v_bias.normal_(0, 1.0)
            blk.gamma_1.fill_(1.0)
            blk.gamma_2.fill_(1.0)
    images = normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.bfloat16)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        ref = model.encoder.transform(model.encoder.embed(images)).float()
        converted = copy.deepcopy(model)
        assert to_fp8(converted) == 4 * cfg.model.depth                # BEiT's qkv included
        out = converted.encoder.transform(converted.encoder.embed(images)).float()
        dropped = copy.deepcopy(model)             # what forgetting the q/v bias would give
        for blk in dropped.encoder.blocks:
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
        wrong = dropped.encoder.transform(dropped.encoder.embed(images)).float()
    assert all(b.attn.qkv_bias_separate for b in converted.encoder.blocks)
    assert F.cosine_similarity(out, ref, dim=-1).min() > 0.99
    assert F.cosine_similarity(wrong, ref, dim=-1).min() < 0.99       # the check above can tell


def test_converted_teacher_targets_track_bf16_on_real_images():
    cfg = _cfg()
    teacher = _teacher(cfg)
    teacher8 = copy.deepcopy(teacher)
    to_fp8(teacher8)
    images = normalize(bench_fp8.photo_crops(8, 32, seed=0), torch.bfloat16)
    with torch.no_grad():
        a, b = teacher(images).float(), teacher8(images).float()
    assert b.dtype == torch.float32 and a.shape == b.shape == (8, 65, 96)
    cos = F.cosine_similarity(a, b, dim=-1)
    # measured (tiny random-init teacher, 4 blocks): mean 0.9989, min 0.9963; bf16 vs fp32 is 0.99998 / 0.99997
    assert cos.mean() > 0.998 and cos.min() > 0.99
    assert cos.mean() < 0.9999                                          # fp8 really ran (bf16 vs bf16 gives 1.0)


def test_unsupported_cuda_capability_is_refused_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    assert supported("cpu") and not supported("cuda") and not supported(torch.device("cuda", 0))
    teacher = _teacher(_cfg())
    with pytest.raises(Fp8Error) as e:
        to_fp8(teacher, device="cuda")
    msg = str(e.value)
    assert "8.9" in msg and "Fake A100 is 8.0" in msg and "bf16" in msg
    assert not any(isinstance(m, Fp8Linear) for m in teacher.modules())   # refused before touching the model
    with pytest.raises(Fp8Error, match="8.9"):
        check_supported("cuda:0")
    for cap in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cap, **k: c)
        assert supported("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not supported("cuda") and not supported("meta")


# ----------------------------------------------------------------------------------------------------------
# the benchmark


SMOKE = ["--arch", "vit_tiny_patch4", "--steps", "4", "--micro-batch", "4", "--images", "8", "--iters", "2",
         "--warmup", "1", "--pool", "8", "--train-batch", "4"]


def test_bench_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "fp8.json"
    assert bench_fp8.cli(SMOKE + ["--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    assert r == json.loads(out.read_text())
    assert "parity (8 real crops" in "\n".join(lines[:-1])
    assert {"arch", "device", "fp8", "parity", "speed", "speedup", "loss", "verdict"} <= set(r)
    assert r["device"] == "cpu" and r["fp8"]["converted"] == 16 and r["fp8"]["linear_left_bf16"] == []
    assert r["fp8"]["teacher_mib_fp8"] < 0.6 * r["fp8"]["teacher_mib_bf16"]
    p = r["parity"]
    assert p["tokens"] == 8 * 65
    fb, bf = p["fp8_vs_bf16"], p["bf16_vs_fp32"]
    assert 0.99 < fb["cos_raw"]["min"] <= fb["cos_raw"]["q001"] <= fb["cos_raw"]["mean"] < 0.99999
    assert 0.99 < fb["cos_std"]["min"] and fb["max_abs_diff_raw"] > 0 and 0 < fb["rel_l2_raw"] < 0.1
    assert bf["cos_std"]["min"] > fb["cos_std"]["min"]                 # bf16's own error is far smaller
    assert set(r["speed"]) == {"bf16", "fp8", "fp8_eager_quant"}
    assert all(v["img_per_s"] > 0 for v in r["speed"].values())
    lo = r["loss"]
    a, b = lo["curves"]["bf16"], lo["curves"]["fp8"]
    assert len(a) == len(b) == 4 and all(math.isfinite(v) for v in a + b)
    assert a != b                                                      # the targets differed...
    assert lo["fp8_vs_bf16"]["max_rel_diff"] < 0.02                    # ...and the curves still match
    assert abs(lo["fp8_vs_bf16"]["final"] - lo["fp8_vs_bf16"]["final_ref"]) < 0.01
    assert r["verdict"]["loss_ok"] is True and r["verdict"]["parity_ok"] in (True, False)


def test_bench_reads_an_export_and_runs_the_fp32_reference(tmp_path, capsys):
    from dbot_ds.checkpoint.export import write_stage_encoder
    cfg = load_config(overrides=TINY)
    student = build_student(cfg.model, seed=7)
    state = {k.removeprefix("encoder."): v for k, v in student.state_dict().items() if k.startswith("encoder.")}
    write_stage_encoder(state, cfg, tmp_path / "export", stage=0, step=1)
    loaded, info = bench_fp8.read_export(str(tmp_path / "export"))
    assert "pos_embed" not in loaded and info["depth"] == 4 and info["arch"] == "vit_tiny_patch4"
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    args = ["--weights", str(tmp_path / "export"), "--steps", "2", "--micro-batch", "4", "--images", "4",
            "--iters", "1", "--warmup", "0", "--pool", "4", "--fp32-run", "--final-norm"]
    assert bench_fp8.cli(args) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["weights"] == str(tmp_path / "export") and r["arch"] == "vit_tiny_patch4" and r["final_norm"] is True
    assert set(r["loss"]["curves"]) == {"bf16", "fp8", "fp32"} and "fp32_vs_bf16" in r["loss"]
    with pytest.raises(SystemExit, match="not found"):
        bench_fp8.read_export(str(tmp_path / "nothing"))


def test_add_command_wires_a_subcommand():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    bench_fp8.add_command(commands)
    a = parser.parse_args(["fp8", "--arch", "vit_huge_patch14", "--micro-batch", "96", "--steps", "100"])
    assert a.func is bench_fp8.main and a.arch == "vit_huge_patch14" and a.micro_batch == 96 and a.steps == 100
    assert a.images == 256 and a.train_batch is None and a.fp32_run is False


def test_saved_photos_give_the_same_crops_and_an_empty_folder_is_an_error(tmp_path):
    """The GPU node has no scikit-image: `--save-photos` there, `--photos` here must read the same pixels."""
    saved = bench_fp8.save_photos(str(tmp_path / "photos"))
    assert len(saved) >= 10 and all(p.suffix == ".png" for p in saved)
    a = bench_fp8.photo_crops(6, 32, seed=3)
    b = bench_fp8.photo_crops(6, 32, seed=3, folder=str(tmp_path / "photos"))
    assert torch.equal(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .jpg/.jpeg/.png files"):
        bench_fp8.photo_crops(1, 32, seed=0, folder=str(tmp_path / "empty"))
