"""dbot-eval on a tiny random encoder exported without training (our Encoder written by export's own writer) over
synthetic labelled shards: the CLI's kNN equals knn.py computed directly, 2 ranks give the same numbers as 1, the
linear probe learns separable features and not shuffled labels, and bad input fails before any image is encoded."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run, torchrun_cmd

SCORES = ("knn_top1_mean", "knn_top5_mean", "knn_top1_cls", "knn_top5_cls")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as each torchrun rank has (OMP_NUM_THREADS=1): the same arithmetic in this process
    as in the ranks, and tiny ops that do not wait on a second thread of a busy machine (60x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A random vit_tiny_patch4 (32 px, width 96, depth 4) as a dbot-export folder."""
    from dbot_ds.checkpoint.export import _write_export, timm_spec, to_timm_state
    from dbot_ds.config import ModelConfig
    from dbot_ds.model.vit import Encoder
    cfg = ModelConfig()
    torch.manual_seed(0)
    state = to_timm_state(Encoder(cfg, cfg.depth).state_dict(), cfg)
    arch, kwargs = timm_spec(cfg, state, cfg.depth, final_norm=True)
    info = {"timm_arch": arch, "timm_kwargs": kwargs, "model_name": "tiny test encoder", "step": 0,
            "img_size": cfg.img_size, "patch_size": cfg.patch_size}
    out = tmp_path_factory.mktemp("export")
    _write_export(out, "encoder", state, info)
    return out


@pytest.fixture(scope="module")
def pattern(shards) -> str:
    from dbot_ds.data.manifest import shard_pattern
    return shard_pattern(shards)                 # 256 labelled 64-px images, 10 classes


def eval_cli(capsys, *args) -> tuple[int, str, str]:
    from dbot_ds.evaluate.cli import cli
    capsys.readouterr()
    rc = cli([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def json_line(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out                  # stdout is the one JSON line, nothing else
    return json.loads(lines[0])


def test_knn_cli_equals_knn_py_computed_directly(tiny_export, pattern, capsys):
    import dbot_ds
    from dbot_ds.evaluate.knn import extract, knn_scores, load_labelled, split_bank_query
    rc, out, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--device", "cpu")
    assert rc == 0, err
    got = json_line(out)
    assert (got["eval"], got["num_bank"], got["num_query"], got["k"], got["img_size"]) == ("knn", 204, 52, 20, 32)
    for pool in ("mean", "cls"):
        t1, t5 = got[f"knn_top1_{pool}"], got[f"knn_top5_{pool}"]
        assert 0 <= t1 <= t5 <= 100 and t5 > t1, got                  # top-5 counts every top-1 hit and more
    assert "features" in err                                            # the progress bar, on stderr

    bank, query = split_bank_query(load_labelled(pattern, 32), 5)
    model = dbot_ds.load_encoder(tiny_export)
    feats = [extract(model.forward_features, s.images, 64, math.ceil(len(s) / 64), torch.float32, torch.device("cpu"))
             for s in (bank, query)]
    want = knn_scores(feats[0], bank.labels, feats[1], query.labels, k=20, temperature=0.07)
    assert {k: got[k] for k in SCORES} == want                           # exactly


def test_leave_one_out_scores_every_image_against_the_others():
    from dbot_ds.evaluate.knn import weighted_knn
    # Two tight pairs of opposite class: an image's nearest other is its pair-mate, so leave-one-out gets every
    # one wrong (k=1), while letting each image vote for itself gets every one right.
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 0, 1])
    assert weighted_knn(feats, labels, feats, labels, k=1) == (100.0, 100.0)
    assert weighted_knn(feats, labels, feats, labels, k=1, leave_one_out=True)[0] == 0.0
    assert weighted_knn(feats, labels, feats, labels, k=1, leave_one_out=True, chunk=3)[0] == 0.0   # across chunks
    with pytest.raises(ValueError, match="bank as its own query set"):
        weighted_knn(feats, labels, feats[:2], labels[:2], k=1, leave_one_out=True)


def test_leave_one_out_cli_equals_knn_py(tiny_export, pattern, capsys):
    import dbot_ds
    from dbot_ds.evaluate.knn import extract, knn_scores, load_labelled
    rc, out, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--leave-one-out",
                            "--device", "cpu", "--limit", "100")
    assert rc == 0, err
    got = json_line(out)
    assert (got["num_bank"], got["num_query"], got["leave_one_out"]) == (100, 100, True)
    data = load_labelled(pattern, 32, limit=100)
    f = extract(dbot_ds.load_encoder(tiny_export).forward_features, data.images, 64, 2, torch.float32,
                torch.device("cpu"))
    want = knn_scores(f, data.labels, f, data.labels, k=20, temperature=0.07, leave_one_out=True)
    assert {k: got[k] for k in SCORES} == want
    rc, _, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--leave-one-out",
                          "--query-every", "4")
    assert rc == 2 and "--leave-one-out scores every --train image" in err
    rc, _, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--leave-one-out",
                          "--limit", "20", "--k", "20")
    assert rc == 2 and "--k 20 is more than the bank's 19 other images" in err


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(tiny_export, pattern, capsys):
    args = ["knn", "--encoder", str(tiny_export), "--train", pattern, "--device", "cpu", "--batch", "24"]
    rc, out, err = eval_cli(capsys, *args)                              # 1 process (this one)
    assert rc == 0, err
    two = run(torchrun_cmd(2) + ["-m", "dbot_ds.evaluate"] + args, timeout=300)
    assert two.returncode == 0, two.tail
    got1, got2 = json_line(out), json_line(two.stdout)                  # rank 1 prints nothing
    assert (got1["world_size"], got2["world_size"]) == (1, 2)
    assert {k: got2[k] for k in SCORES} == {k: got1[k] for k in SCORES}, (got1, got2)
    # 204 bank / 52 query images in batches of 24 over 2 ranks: both slices end in a padded batch
    assert (got2["num_bank"], got2["num_query"]) == (204, 52)


def test_dbot_eval_entry_point_is_installed():
    from importlib.metadata import entry_points
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("dbot-eval") == "dbot_ds.evaluate.cli:cli", "dbot-eval is missing: pip install -e ."


def test_img_size_other_than_the_encoders(tiny_export, pattern, capsys):
    rc, out, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--img-size", "48",
                            "--limit", "60", "--k", "5", "--device", "cpu")
    assert rc == 0, err
    got = json_line(out)
    assert got["img_size"] == 48 and got["num_bank"] + got["num_query"] == 60
    rc, _, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--img-size", "30")
    assert rc == 2 and "--img-size 30" in err and "patch size 4" in err and "28" in err


def clusters(n: int, dim: int = 32, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: class centres ~ N(0, 1) per dimension, points at std 0.5 around them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=g), labels


def test_linear_probe_learns_clusters_not_shuffled_labels():
    from dbot_ds.evaluate.probe import train_linear_probe
    x, y = clusters(2000)
    qx, qy = clusters(500, seed=1)
    got = train_linear_probe(x, y, qx, qy, epochs=10, lr=0.1, batch_size=128)
    assert got["linear_top1"] > 90 and got["linear_top5"] >= got["linear_top1"], got
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    chance = train_linear_probe(x, shuffled, qx, qy, epochs=10, lr=0.1, batch_size=128)
    assert chance["linear_top1"] < 20, chance                            # 10 classes: chance is 10%
    assert train_linear_probe(x, y, qx, qy, epochs=2, seed=5) == train_linear_probe(x, y, qx, qy, epochs=2, seed=5)


def test_lr_schedule_warms_up_then_half_cosine():
    from dbot_ds.evaluate.probe import lr_at
    lrs = [lr_at(s, 100, 10, 0.1) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.05) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_linear_cli_prints_its_record(tiny_export, pattern, capsys):
    rc, out, err = eval_cli(capsys, "linear", "--encoder", tiny_export, "--train", pattern, "--pool", "mean",
                            "--epochs", "3", "--batch-size", "64", "--device", "cpu")
    assert rc == 0, err
    got = json_line(out)
    want = ("linear", "mean", 3, 204, 52)
    assert (got["eval"], got["pool"], got["epochs"], got["num_bank"], got["num_query"]) == want
    assert 0 <= got["linear_top1"] <= got["linear_top5"] <= 100 and got["seconds"] > 0


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any image is encoded


@pytest.fixture
def no_forward(monkeypatch):
    """Fail the test if anything is encoded: every check must come first."""
    import dbot_ds.evaluate.cli as ev

    def refuse(*a, **k):
        raise AssertionError("images were encoded before the input was checked")
    monkeypatch.setattr(ev, "gathered_features", refuse)


def unlabelled_shard(folder: Path) -> str:
    import webdataset as wds
    from PIL import Image
    folder.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue()})
    return str(folder / "shard-000000.tar")


def test_unlabelled_shards_are_refused(tiny_export, tmp_path, capsys, no_forward):
    rc, out, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", unlabelled_shard(tmp_path / "u"))
    assert rc == 2 and out == ""
    assert err.startswith("dbot-eval: error: --train=") and "no 'cls' label" in err and len(err.splitlines()) == 1


def test_empty_query_set_is_refused(tiny_export, pattern, tmp_path, capsys, no_forward):
    import webdataset as wds
    empty = tmp_path / "empty.tar"
    with wds.TarWriter(str(empty)):
        pass
    rc, _, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--query", empty)
    assert rc == 2 and "no query images" in err and "--query PATTERN" in err
    rc, _, err = eval_cli(capsys, "linear", "--encoder", tiny_export, "--train", pattern, "--query-every", "1",
                          "--limit", "4")
    assert rc == 2 and "bank is empty" in err and "--query-every" in err


def test_bank_smaller_than_k_is_refused(tiny_export, pattern, capsys, no_forward):
    rc, _, err = eval_cli(capsys, "knn", "--encoder", tiny_export, "--train", pattern, "--limit", "20", "--k", "20")
    assert rc == 2 and "--k 20 is more than the bank's 16 images" in err and "lower --k" in err


def test_encoder_that_is_neither_export_nor_checkpoint(tmp_path, pattern, capsys, no_forward):
    (tmp_path / "stuff").mkdir()
    for path in (tmp_path / "stuff", tmp_path / "missing"):
        rc, _, err = eval_cli(capsys, "knn", "--encoder", path, "--train", pattern)
        assert rc == 2 and f"--encoder {path} is neither an export" in err and "dbot-export --out" in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_checkpoint_is_exported_first(tiny_export, pattern, tmp_path, capsys, monkeypatch):
    """A run folder goes through export.export (its student, the given tag) into a temporary folder; here export
    is replaced by a copy of the tiny export, so no training run (and no DeepSpeed) is needed."""
    from dataclasses import asdict

    import dbot_ds.evaluate.cli as ev
    from dbot_ds.config import ModelConfig
    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step00000002")                 # --tag wins over latest
    complete = {"step": 4, "stage": 2, "client_state": {"config": {"model": asdict(ModelConfig())},
                                                        "plan_lengths": [2, 2]}}
    (tag / "COMPLETE").write_text(json.dumps(complete))
    calls = []

    def fake_export(path, out, tag=None, which="student"):
        calls.append((path, tag, which))
        for f in ("encoder.safetensors", "encoder.json"):
            shutil.copy(tiny_export / f, Path(out) / f)
    monkeypatch.setattr(ev, "export", fake_export)
    rc, out, err = eval_cli(capsys, "knn", "--encoder", tmp_path / "run", "--tag", "step00000004", "--train", pattern,
                            "--limit", "40", "--k", "5", "--device", "cpu")
    assert rc == 0, err
    assert calls == [(str(tmp_path / "run"), "step00000004", "student")]
    assert "is a checkpoint (step00000004): exporting its student" in err
    assert json_line(out)["tag"] == "step00000004"

    # stage 0's stage-end checkpoint, saved after the swap: its student is a fresh init, refused before any work
    swap = tag.parent / "step00000002"
    swap.mkdir()
    (swap / "COMPLETE").write_text(json.dumps(dict(complete, step=2, stage=1, stage_end=True)))
    calls.clear()
    rc, _, err = eval_cli(capsys, "knn", "--encoder", tmp_path / "run", "--train", pattern)     # latest: step2
    assert rc == 2 and calls == [] and "after the teacher swap" in err and "--which teacher" in err


# ----------------------------------------------------------------------------------------------------------
# The online monitor's stage-end score is dbot-eval's on the same weights


def test_monitor_stage_end_score_equals_dbot_eval_on_the_same_weights(pattern, tmp_path, capsys):
    """A stage's fp32 encoder, scored by the monitor at the stage end (`evaluate_encoder`, as the trainer calls it
    with `full_fp32_state`) and by `dbot-eval knn` on the export folder the trainer writes for it
    (`write_stage_encoder`: stage_encoders/stageK): exactly the same four scores. The monitor is built for a bf16
    run, yet the stage-end score is fp32 (fp32 images, forward and weights), as dbot-eval's."""
    import dataclasses

    from dbot_ds.checkpoint.export import write_stage_encoder
    from dbot_ds.config import build_config
    from dbot_ds.model.vit import BeitEncoder, Encoder
    from dbot_ds.train.monitor import KnnMonitor
    cfg = build_config({"schedule.stage_steps": [2, 2], "eval.shards": pattern, "eval.k": 10, "eval.query_every": 4,
                        "eval.max_images": 200, "optim.micro_batch": 24, "optim.global_batch": 24})
    torch.manual_seed(0)
    state = Encoder(cfg.model, cfg.model.depth).state_dict()                  # our names, final norm, fp32
    write_stage_encoder(state, cfg, tmp_path / "stage1", 1, 4)
    monitor = KnnMonitor(cfg, (pattern, ""), 0, 1, torch.device("cpu"), torch.bfloat16)
    got = monitor.evaluate_encoder(state)

    e = cfg.eval
    rc, out, err = eval_cli(capsys, "knn", "--encoder", tmp_path / "stage1", "--train", e.shards, "--query-every",
                            e.query_every, "--limit", e.max_images, "--k", e.k, "--temperature", e.temperature,
                            "--batch", cfg.optim.micro_batch, "--device", "cpu")
    assert rc == 0, err
    want = json_line(out)
    assert (want["num_bank"], want["num_query"]) == (len(monitor.bank.labels), len(monitor.query.labels)) == (150, 50)
    assert {k: got[k] for k in SCORES} == {k: want[k] for k in SCORES}, (got, want)
    assert 0 < got["knn_top1_mean"] < got["knn_top5_mean"] < 100

    # the symmetric (BEiT) student's stage end: its own encoder, fp32 too (dbot-export has no timm form for it)
    sym = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, student="symmetric"))
    beit = BeitEncoder(sym.model).eval()
    rec = KnnMonitor(sym, (pattern, ""), 0, 1, torch.device("cpu"), torch.bfloat16).evaluate_encoder(beit.state_dict())
    direct = monitor.evaluate(beit, dtype=torch.float32)
    assert {k: rec[k] for k in SCORES} == {k: direct[k] for k in SCORES}
