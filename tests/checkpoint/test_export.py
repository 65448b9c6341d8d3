"""dbot-export on real checkpoints: 2-stage runs of 2 DeepSpeed processes (ZeRO-3 and ZeRO-2) on the CPU, exported
to timm and checked against DeepSpeed's own consolidation, our Encoder and teacher.pt."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, launch_pretrain, read_metrics
from testkit import fake_checkpoint

TAG_MID, TAG_FINAL = "step00000002", "step00000004"     # post-swap stage-end of stage 0; the final checkpoint


# The kNN monitor at every step, on the (labelled) training shards: bank 204 and 52 query images.
MONITOR = ["eval.every_steps=1", "eval.k=10"]


@pytest.fixture(scope="module")
def ds_run(shards, tmp_path_factory):
    """ds_run('zero3' | 'zero2', monitor=True) -> run folder of a finished 2-stage run ([2, 2] steps, 2 processes,
    the kNN monitor on unless monitor=False), made once."""
    cache: dict[tuple[str, bool], Path] = {}

    def make(zero: str, monitor: bool = True) -> Path:
        if (zero, monitor) not in cache:
            out = tmp_path_factory.mktemp(f"run_{zero}")
            launch_pretrain(2, TINY + [f"data.shards={shards}", f"run.out_dir={out}", "schedule.stage_steps=[2,2]",
                                       "schedule.warmup_steps=1", "run.save_every=100", f"deepspeed.config={zero}",
                                       "run.log_every=1"]
                            + ([f"eval.shards={shards}"] + MONITOR if monitor else []))
            cache[(zero, monitor)] = out
        return cache[(zero, monitor)]
    return make


def export_cli(capsys, *args) -> tuple[int, str]:
    from dbot_ds.checkpoint.export_cli import cli
    capsys.readouterr()
    rc = cli([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def read_export(d: Path, name: str = "encoder") -> tuple[dict, dict]:
    from safetensors.torch import load_file
    return load_file(str(d / f"{name}.safetensors")), json.loads((d / f"{name}.json").read_text())


def timm_model(info: dict, state: dict):
    import timm
    m = timm.create_model(info["timm_arch"], pretrained=False, num_classes=0, **info["timm_kwargs"])
    m.load_state_dict(state, strict=True)
    return m.eval()


def teacher_dtype(run_dir: Path) -> torch.dtype:
    """teacher.pt's dtype: bf16 in a bf16 run (teacher.precision=bf16), fp32 in an fp32 run (the tests' default)."""
    cfg = json.loads((run_dir / "checkpoints" / TAG_FINAL / "COMPLETE").read_text())["client_state"]["config"]
    bf16 = cfg["optim"]["precision"] == "bf16" and cfg["teacher"]["precision"] == "bf16"
    return torch.bfloat16 if bf16 else torch.float32


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero3", "zero2"])
def test_final_student_export_is_timm_and_equals_deepspeed_and_encoder(ds_run, zero, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import dbot_ds
    from dbot_ds.config import ModelConfig
    from dbot_ds.model.vit import Encoder, sincos_pos_embed_2d

    run_dir = ds_run(zero)
    rc, out = export_cli(capsys, run_dir, "--out", tmp_path)           # run folder -> checkpoints/latest
    assert rc == 0, out
    state, info = read_export(tmp_path)
    complete = json.loads((run_dir / "checkpoints" / TAG_FINAL / "COMPLETE").read_text())

    # encoder.json
    assert info["timm_arch"] == "vit_base_patch16_224"                  # vit_tiny_patch4 at 32 px: no named model
    assert info["model_name"].startswith("custom ViT: width 96, depth 4, 3 heads, patch 4, 32 px")
    assert info["run_finished"] is True
    mask = os.umask(0)
    os.umask(mask)
    for f in ("encoder.safetensors", "encoder.json"):                  # both follow the user's umask
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert info["timm_kwargs"] == dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
    assert (info["stage"], info["step"], info["tag"], info["which"]) == (1, 4, TAG_FINAL, "student")
    assert f"student of {TAG_FINAL} (stage 1 (final), step 4): " in out, out    # the last stage, not COMPLETE's 2
    assert info["arch"] == "vit_tiny_patch4" and info["trained_in_stage"] == 1
    assert info["zero_stage"] == (3 if zero == "zero3" else 2) and info["world_size"] == 2
    assert info["config"] == complete["client_state"]["config"]
    assert info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]

    # exactly DeepSpeed's consolidated fp32 encoder weights, plus the recomputed sin-cos positions
    ds = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=TAG_FINAL)
    enc = {k[len("encoder."):]: v for k, v in ds.items() if k.startswith("encoder.")}
    assert set(state) == set(enc) | {"pos_embed"}
    for k, v in enc.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    assert torch.equal(state["pos_embed"], sincos_pos_embed_2d(96, 8)[None])

    # timm (strict) == our Encoder built from the same weights, and the public API gives the same
    model = timm_model(info, state)
    ours = Encoder(ModelConfig(**info["config"]["model"]), info["depth"]).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == ["pos_embed"]
    x = images()
    with torch.no_grad():
        ref = ours(x)
        got = model.forward_features(x)
    assert got.shape == (2, 65, 96)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    loaded = dbot_ds.load_encoder(tmp_path)
    assert not loaded.training
    torch.testing.assert_close(dbot_ds.encode(loaded, x), ref, rtol=1e-5, atol=1e-5)
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)     # uint8 input is normalised as in training
    mean, std = torch.tensor(info["mean"]).view(3, 1, 1), torch.tensor(info["std"]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(dbot_ds.encode(loaded, u8), ours((u8.float() / 255 - mean) / std), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_post_swap_checkpoint_student_refused_teacher_exported(ds_run, tmp_path, capsys):
    run_dir = ds_run("zero3")
    tag_dir = run_dir / "checkpoints" / TAG_MID
    rc, out = export_cli(capsys, tag_dir, "--out", tmp_path / "s")        # a tag folder path
    assert rc == 2
    assert "after the teacher swap" in out and "re-initialised" in out and "--which teacher" in out
    assert not (tmp_path / "s").exists()

    rc, out = export_cli(capsys, tag_dir, "--out", tmp_path / "t", "--which", "teacher")
    assert rc == 0, out
    state, info = read_export(tmp_path / "t")
    teacher = torch.load(tag_dir / "teacher.pt", map_location="cpu", weights_only=True)
    assert teacher["depth"] == 4
    assert set(state) == set(teacher["state"]) | {"pos_embed"}
    for k, v in teacher["state"].items():
        assert v.dtype == teacher_dtype(run_dir) and state[k].dtype == torch.float32 and torch.equal(state[k], v.float()), k
    assert (info["which"], info["step"], info["stage"], info["trained_in_stage"]) == ("teacher", 2, 1, 0)
    assert info["timm_kwargs"]["final_norm"] is False and info["final_norm"] is False   # teacher.final_norm=false
    model = timm_model(info, state)
    with torch.no_grad():
        assert model.forward_features(images()).shape == (2, 65, 96)

    # --also-teacher on the final checkpoint (via --tag): stage 1's teacher is the same stage-0 student
    rc, out = export_cli(capsys, run_dir, "--tag", TAG_FINAL, "--out", tmp_path / "f", "--also-teacher")
    assert rc == 0, out
    final_teacher, tinfo = read_export(tmp_path / "f", "teacher")
    assert tinfo["which"] == "teacher" and tinfo["step"] == 4 and tinfo["trained_in_stage"] == 0
    assert all(torch.equal(final_teacher[k], state[k]) for k in state)
    _, sinfo = read_export(tmp_path / "f")
    assert sinfo["which"] == "student" and sinfo["trained_in_stage"] == 1


@pytest.mark.slow
def test_paths_resolve_to_the_same_export(ds_run, tmp_path, capsys):
    run_dir = ds_run("zero3")
    ref, _ = read_export(_export(capsys, run_dir, tmp_path / "run"))
    for name, args in [("ckpts", [run_dir / "checkpoints"]), ("tagdir", [run_dir / "checkpoints" / TAG_FINAL]),
                       ("tag", [run_dir, "--tag", TAG_FINAL])]:
        got, info = read_export(_export(capsys, *args, tmp_path / name))
        assert info["tag"] == TAG_FINAL
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
    # existing files are kept unless --force
    rc, out = export_cli(capsys, run_dir, "--out", tmp_path / "run")
    assert rc == 2 and "--force" in out
    assert export_cli(capsys, run_dir, "--out", tmp_path / "run", "--force")[0] == 0


def _export(capsys, *args) -> Path:
    *src, out = args
    rc, text = export_cli(capsys, *src, "--out", out)
    assert rc == 0, text
    return Path(out)


@pytest.mark.slow
def test_missing_and_incomplete_checkpoints_fail_clearly(ds_run, tmp_path, capsys):
    run_dir = ds_run("zero3")
    rc, out = export_cli(capsys, tmp_path / "nope", "--out", tmp_path / "o")
    assert rc == 2 and "does not exist" in out

    (tmp_path / "empty").mkdir()
    rc, out = export_cli(capsys, tmp_path / "empty", "--out", tmp_path / "o")
    assert rc == 2 and "no checkpoints found" in out

    rc, out = export_cli(capsys, run_dir, "--tag", "step00000099", "--out", tmp_path / "o")
    assert rc == 2 and "does not exist" in out and TAG_FINAL in out          # names the complete tags

    # a crash mid-save: a tag folder with DeepSpeed's files but no COMPLETE (and `latest` not moved to it)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(run_dir / "checkpoints" / TAG_FINAL, ckpts / "step00000006")
    (ckpts / "step00000006" / "COMPLETE").unlink()
    for args in ([ckpts / "step00000006"], [tmp_path / "run", "--tag", "step00000006"]):
        rc, out = export_cli(capsys, *args, "--out", tmp_path / "o")
        assert rc == 2 and "incomplete" in out and "COMPLETE" in out, out
    rc, out = export_cli(capsys, tmp_path / "run", "--out", tmp_path / "o")      # no latest, nothing complete
    assert rc == 2 and "no complete checkpoint" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_depth0_teacher_cannot_be_exported(ds_run, tmp_path, capsys):
    run_dir = ds_run("zero3")
    tag_dir = tmp_path / "checkpoints" / TAG_FINAL
    shutil.copytree(run_dir / "checkpoints" / TAG_FINAL, tag_dir)
    t = torch.load(tag_dir / "teacher.pt", map_location="cpu", weights_only=True)
    keep = {k: v for k, v in t["state"].items() if k.startswith(("patch_embed.", "cls_token"))}
    torch.save({"depth": 0, "state": keep}, tag_dir / "teacher.pt")
    rc, out = export_cli(capsys, tag_dir, "--which", "teacher", "--out", tmp_path / "o")
    assert rc == 2 and "teacher.pt is " in out and "when saved" in out      # changed (smaller) since the save
    from dbot_ds.checkpoint.safety import main as ckpt_safety
    assert ckpt_safety(["record", str(tag_dir)]) == 0                       # a deliberate edit, re-recorded
    rc, out = export_cli(capsys, tag_dir, "--which", "teacher", "--out", tmp_path / "o")
    assert rc == 2 and "depth 0" in out and "--which student" in out
    rc, out = export_cli(capsys, tag_dir, "--also-teacher", "--out", tmp_path / "o")
    assert rc == 2 and not (tmp_path / "o").exists()                       # nothing written half-way


@pytest.mark.slow
@pytest.mark.parametrize("arch,img,want", [
    ("vit_base_patch16", 224, ("vit_base_patch16_224", {})),
    ("vit_base_patch16", 384, ("vit_base_patch16_384", {})),
    ("vit_large_patch16", 224, ("vit_large_patch16_224", {})),
    ("vit_huge_patch14", 224, ("vit_huge_patch14_224", {})),
    ("vit_huge_patch14", 448, ("vit_huge_patch14_224", {"img_size": 448})),
    ("vit_giant_patch14", 224, ("vit_giant_patch14_224", {})),
    ("vit_gigantic_patch14", 224, ("vit_gigantic_patch14_224", {})),
    ("vit_small_patch8", 64, ("vit_base_patch16_224", dict(img_size=64, patch_size=8, embed_dim=192, depth=6,
                                                           num_heads=6, mlp_ratio=4.0))),
])
def test_timm_names_match_our_architectures(arch, img, want):
    """Built on the meta device: names, widths, depths, heads and MLP sizes agree with timm 1.0's models."""
    from dbot_ds.checkpoint.export import timm_spec, to_timm_state
    from dbot_ds.config import build_config
    from dbot_ds.model.vit import Encoder
    cfg = build_config({"model.arch": arch, "model.img_size": img, "schedule.stage_steps": [1]}).model
    with torch.device("meta"):
        state = Encoder(cfg, cfg.depth).state_dict()
        no_norm = Encoder(cfg, cfg.depth, final_norm=False).state_dict()     # a teacher without the final norm
    assert timm_spec(cfg, to_timm_state(state, cfg), cfg.depth, True) == want
    assert timm_spec(cfg, to_timm_state(no_norm, cfg), cfg.depth, False) == (want[0], dict(want[1], final_norm=False))


@pytest.mark.slow
def test_public_api_imports_without_deepspeed():
    code = ("import sys, dbot_ds, dbot_ds.checkpoint.export; assert 'deepspeed' not in sys.modules, 'deepspeed imported'; "
            "assert callable(dbot_ds.load_encoder) and callable(dbot_ds.encode)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------ stage encoders and the kNN monitor

@pytest.mark.slow
def test_every_stage_encoder_is_kept_whole_and_exported_with_stage(ds_run, tmp_path, capsys):
    """stage_encoders/stage0 is the fp32 student at the end of stage 0 (final norm included): the post-swap
    checkpoint's teacher is exactly its cast (bf16, or fp32 in an fp32 run); stage1 is exactly the final
    checkpoint's fp32 student."""
    from dbot_ds.checkpoint.safety import load_teacher_file
    run_dir = ds_run("zero3")
    s0, info0 = read_export(run_dir / "stage_encoders" / "stage0")
    assert (info0["stage"], info0["step"], info0["trained_in_stage"], info0["final_norm"]) == (0, 2, 0, True)
    teacher = load_teacher_file(run_dir / "checkpoints" / TAG_MID / "teacher.pt", False)
    assert teacher["depth"] == 4 and "norm.weight" not in teacher["state"] and "norm.weight" in s0
    for k, v in teacher["state"].items():
        assert v.dtype == teacher_dtype(run_dir) and torch.equal(s0[k].to(v.dtype), v), k

    rc, out = export_cli(capsys, run_dir, "--out", tmp_path / "final")
    assert rc == 0, out
    final, _ = read_export(tmp_path / "final")
    s1, info1 = read_export(run_dir / "stage_encoders" / "stage1")
    assert info1["stage"] == 1 and set(s1) == set(final)
    assert all(torch.equal(s1[k], final[k]) for k in final)

    rc, out = export_cli(capsys, run_dir, "--stage", 0, "--out", tmp_path / "s0")
    assert rc == 0 and "of the end of stage 0" in out, out
    assert (tmp_path / "s0/encoder.safetensors").read_bytes() == (run_dir / "stage_encoders/stage0/encoder.safetensors").read_bytes()
    rc, out = export_cli(capsys, run_dir, "--stage", 5, "--out", tmp_path / "s5")
    assert rc == 2 and "stage 5 has not ended" in out and "['stage0', 'stage1']" in out, out
    rc, out = export_cli(capsys, run_dir / "checkpoints" / TAG_MID, "--out", tmp_path / "mid")
    assert rc == 2 and "--stage 0" in out, out            # the refusal of the post-swap student points to it


@pytest.mark.slow
def test_knn_monitor_logs_each_step_stage_end_and_teacher_without_changing_training(ds_run):
    """Step 0 (random init), every step, the stage-0 end (student, then the new teacher), the final end; the
    losses are those of the same run without the monitor, exactly; ZeRO-2 and ZeRO-3 agree at step 0 (same
    initial weights, same rank slices), and every rank agreed (the monitor checks it, else the run fails)."""
    runs = {z: read_metrics(ds_run(z)) for z in ("zero2", "zero3")}
    plain = read_metrics(ds_run("zero2", monitor=False))
    for z, recs in runs.items():
        evals = [(r["step"], r["stage"], r["model"]) for r in recs if r.get("event") == "eval"]
        assert evals == [(0, 0, "student"), (1, 0, "student"), (2, 0, "student"), (2, 1, "teacher"),
                         (3, 1, "student"), (4, 1, "student")], (z, evals)
        for r in recs:
            if r.get("event") == "eval":
                assert 0 <= r["knn_top1_mean"] <= r["knn_top5_mean"] <= 100 and r["seconds"] > 0
                assert 0 <= r["knn_top1_cls"] <= r["knn_top5_cls"] <= 100
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]
    assert losses(runs["zero2"]) == losses(plain) and len(losses(plain)) == 4
    first = [{k: v for k, v in r.items() if k.startswith("knn_")} for r in (runs["zero2"] + runs["zero3"])
             if r.get("event") == "eval" and r["step"] == 0]
    assert first[0] == first[1]
    assert not (ds_run("zero2", monitor=False) / "tensorboard").exists()


@pytest.mark.slow
def test_stage_end_monitor_records_equal_dbot_eval_of_the_stage_encoders(ds_run, capsys):
    """Each stage end's student record (2 ranks, ZeRO-3, in the run) is exactly `dbot-eval knn` (1 process) on the
    encoder that stage ended with, stage_encoders/stage{K}, under the monitor's settings (MONITOR: k=10)."""
    from dbot_ds.evaluate.cli import cli
    run_dir = ds_run("zero3")
    config = json.loads((run_dir / "stage_encoders" / "stage0" / "encoder.json").read_text())["config"]
    e, batch = config["eval"], config["optim"]["micro_batch"]
    ends = {r["stage"]: r for r in read_metrics(run_dir)            # stage K ends at step 2 (K + 1)
            if r.get("event") == "eval" and r["model"] == "student" and r["step"] == 2 * (r["stage"] + 1)}
    assert sorted(ends) == [0, 1], ends
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # each rank's arithmetic (OMP_NUM_THREADS=1)
    try:
        for stage, rec in ends.items():
            capsys.readouterr()
            rc = cli(["knn", "--encoder", str(run_dir / "stage_encoders" / f"stage{stage}"), "--train", e["shards"],
                      "--query-every", str(e["query_every"]), "--k", str(e["k"]), "--temperature",
                      str(e["temperature"]), "--batch", str(batch), "--device", "cpu"])
            cap = capsys.readouterr()
            assert rc == 0, cap.err
            got = json.loads(cap.out)
            scores = ("knn_top1_mean", "knn_top5_mean", "knn_top1_cls", "knn_top5_cls")
            assert {k: got[k] for k in scores} == {k: rec[k] for k in scores}, (stage, got, rec)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------ the stage label, without training

@pytest.fixture
def fake_student(monkeypatch):
    """DeepSpeed's consolidation replaced by a random student (encoder + a decoder key, as zero_to_fp32 gives)."""
    import dbot_ds.checkpoint.export_cli as ex
    from dbot_ds.model.vit import Encoder

    def consolidate(ref):
        torch.manual_seed(2)
        enc = Encoder(ref.model_cfg, ref.model_cfg.depth).state_dict()
        return {**{f"encoder.{k}": v for k, v in enc.items()}, "decoder_norm.weight": torch.ones(8)}
    monkeypatch.setattr(ex, "_consolidate_student", consolidate)


def test_finished_run_is_labelled_with_its_last_stage(fake_student, tmp_path, capsys):
    """The final checkpoint of a 2-stage run records stage 2 (== num_stages: the run is over) in COMPLETE; the
    export names stage 1, the last one that exists, in its printed label and in encoder.json."""
    from dbot_ds.checkpoint.export_cli import describe
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir / "checkpoints", 192, 2, stage_end=True)
    rc, out = export_cli(capsys, run_dir, "--out", tmp_path / "final", "--also-teacher")
    assert rc == 0, out
    assert "student of step00000192 (stage 1 (final), step 192): timm.create_model(" in out, out
    assert "stage 2" not in out
    _, info = read_export(tmp_path / "final")
    assert (info["stage"], info["trained_in_stage"], info["run_finished"], info["num_stages"]) == (1, 1, True, 2)
    assert (info["step"], info["tag"], info["which"]) == (192, "step00000192", "student")
    _, tinfo = read_export(tmp_path / "final", "teacher")       # stage 1's teacher: stage 0's trained student
    assert (tinfo["stage"], tinfo["trained_in_stage"], tinfo["run_finished"]) == (1, 0, True)
    assert describe(tinfo) == "teacher of step00000192 (stage 1 (final), step 192; trained in stage 0)"


@pytest.mark.parametrize("step,stage,stage_end,label,trained", [
    (50, 0, False, "stage 0, step 50", 0),                      # mid-stage: the stage it is in
    (96, 1, True, "stage 1, step 96; trained in stage 0", 0),   # stage 0's end, after the swap: the teacher only
    (150, 1, False, "stage 1, step 150", 1),
])
def test_unfinished_checkpoints_are_labelled_with_their_stage(fake_student, tmp_path, capsys, step, stage,
                                                              stage_end, label, trained):
    tag = fake_checkpoint(tmp_path / "checkpoints", step, stage, stage_end)
    which = "teacher" if stage_end else "student"
    rc, out = export_cli(capsys, tag, "--which", which, "--out", tmp_path / "e")
    assert rc == 0, out
    assert f"{which} of {tag.name} ({label}): " in out, out
    _, info = read_export(tmp_path / "e")
    assert (info["stage"], info["trained_in_stage"], info["run_finished"]) == (stage, trained, False)
