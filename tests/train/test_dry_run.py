"""`dbot-pretrain --dry-run` (dbot_ds/train/dry_run.py): the checks of a start, a report, exit 0, and nothing built,
trained or written; a failing check exits 2 with the start's own error."""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import TINY, launch_pretrain, run

from dbot_ds import pretrain
from dbot_ds.checkpoint.storage import probe_writable
from dbot_ds.config import ConfigError, load_config
from dbot_ds.data.augment import _Decoder
from dbot_ds.data.manifest import expand_shards, shard_pattern
from dbot_ds.train.dry_run import detect_card, first_sample, unwritable

# The demo's schedule (stages of 3 epochs, warmup 0.5) on the 256-image `shards`: 4 steps an epoch, [12, 12] steps.
COMMON = ["data.num_workers=0", "run.progress=false", "data.shuffle_buffer=32", "eval.shards=", "eval.synthetic_num=0"]

# Runs dbot-pretrain in-process, then says whether DeepSpeed's communication layer or an engine ever came to be.
PROBE = ("import gc, sys\n"
         "from dbot_ds.pretrain import cli\n"
         "rc = cli(sys.argv[1:])\n"
         "import deepspeed.comm.comm as dscomm\n"
         "engines = sum(type(o).__name__ == 'DeepSpeedEngine' for o in gc.get_objects())\n"
         "print(f'probe: rc={rc} deepspeed_comm={dscomm.cdb is not None} engines={engines}')\n"
         "sys.exit(rc)\n")


def dry_run(args: list[str], expect_rc: int = 0):
    proc = run([sys.executable, "-c", PROBE, "--dry-run", "--preset", "demo"] + args)
    assert proc.returncode == expect_rc, proc.tail
    return proc


def config_block(stdout: str) -> str:
    """The YAML the report prints: the lines after its header, up to the next [dbot] line."""
    out = []
    for line in stdout.split("[dbot] config (the config.yaml this run writes):\n", 1)[1].splitlines():
        if line.startswith("[dbot]"):
            break
        out.append(line)
    return "\n".join(out)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# -- pieces, in-process ----------------------------------------------------------------------------------------

def test_flags_parse_on_either_side_of_the_overrides():
    a = pretrain.parse_args(["--preset", "demo", "optim.precision=fp32", "--dry-run", "data.shards=x", "--card",
                             "A100"])
    assert (a.dry_run, a.card, a.overrides) == (True, "A100", ["optim.precision=fp32", "data.shards=x"])
    assert not pretrain.parse_args(["--preset", "demo"]).dry_run
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--preset", "demo", "--card", "A100"])        # --card goes with --dry-run
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--preset", "demo", "--dry-run", "--card", "TPU"])


def test_the_run_folder_check_says_what_a_start_says_without_writing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    fresh = tmp_path / "a" / "b"
    assert unwritable(fresh) is None and not (tmp_path / "a").exists()         # would be created: nothing made
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        for folder in (afile, afile / "run", readonly / "run"):
            assert unwritable(folder) == probe_writable(folder), folder        # the same line (or None, as root)
        assert "cannot write to" in unwritable(afile)
    finally:
        readonly.chmod(0o755)


def test_first_sample_decodes_through_the_training_decoder_and_names_a_bad_shard(shards, tmp_path):
    urls = expand_shards(shard_pattern(shards))
    line = first_sample(urls[-1], 5, _Decoder(32))
    assert "JPEG 64x64 -> 3x32x32" in line, line
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    with pytest.raises(ConfigError, match="sample 0 of shard .*garbage.tar cannot be read"):
        first_sample(str(garbage), 0, _Decoder(32))
    broken = tmp_path / "broken.tar"                        # a tar whose image is not one
    (tmp_path / "000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with tarfile.open(broken, "w") as tar:
        tar.add(tmp_path / "000.jpg", arcname="000.jpg")
    with pytest.raises(ConfigError, match="'000'.* does not decode"):
        first_sample(str(broken), 0, _Decoder(32))


def test_gpu_names_map_to_dbot_plan_cards():
    assert detect_card("NVIDIA H200") == "H200"
    assert detect_card("NVIDIA A100-SXM4-80GB") == "A100"
    assert detect_card("NVIDIA GeForce RTX 4090") == "RTX4090"
    assert detect_card("Tesla T4") is None


# -- whole dry runs (processes) ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run_of_the_demo_reports_and_builds_and_writes_nothing(tmp_path, shards):
    out = tmp_path / "run"
    proc = dry_run(COMMON + [f"data.shards={shards}", f"run.out_dir={out}"])
    text = proc.stdout
    assert "probe: rc=0 deepspeed_comm=False engines=0" in text, proc.tail       # no DeepSpeed, no engine
    assert not out.exists(), sorted(out.rglob("*"))                            # nothing written, not even the folder
    overrides = COMMON + [f"data.shards={shards}", f"run.out_dir={out}", "optim.precision=fp32"]
    assert yaml.safe_load(config_block(text)) == load_config(preset="demo", overrides=overrides).to_dict()
    assert "[dbot] data: 4 shards, 256 samples (count from manifest.json beside the shards)" in text
    assert "[dbot]   first shard shard-000000.tar: '" in text and "[dbot]   last shard shard-000003.tar: '" in text
    assert "JPEG 64x64 -> 3x32x32" in text
    assert "[dbot]   rank 0: resampled, draws from all 4 shards" in text
    assert f"[dbot] resume: --resume auto would start fresh (no complete checkpoint in {out / 'checkpoints'})" in text
    assert ("[dbot] plan: 2 stage(s), 24 optimizer steps of 64 images (1 rank(s) x micro-batch 32 x 2 accumulation); "
            "an epoch of 256 samples is 4 steps") in text
    assert ("[dbot]   stage 0: steps 0-11 (12 steps, 3 epochs), teacher depth 0; LR warmup 2 steps (0.5 epochs) to "
            "0.001, then cosine to 0") in text
    assert "[dbot]   stage 1: steps 12-23 (12 steps, 3 epochs), teacher depth 4" in text
    assert f"[dbot] run folder: {out} (would be created in {tmp_path}, writable)" in text
    assert "[dbot] memory per GPU (dbot-plan --arch vit_tiny_patch4 --img-size 32 --zero 2 --world 1" in text
    assert "[dbot] time: give --card NAME" in text
    assert text.count("[dbot] dry run passed") == 1


@pytest.mark.slow
def test_dry_run_after_a_real_run_would_continue_it_and_leaves_the_folder_alone(tmp_path, shards):
    out = tmp_path / "run"
    common = COMMON + [f"data.shards={shards}", f"run.out_dir={out}", "run.stop_after_steps=2"]
    launch_pretrain(0, common)
    before = snapshot(out)
    assert "checkpoints/step00000002/COMPLETE" in before
    proc = dry_run(common)
    assert snapshot(out) == before                                              # not a byte written or touched
    text = proc.stdout
    assert "probe: rc=0 deepspeed_comm=False engines=0" in text, proc.tail
    assert f"[dbot] resume: --resume auto would continue step00000002 at step 2 (stage 0) from {out / 'checkpoints'}" \
        in text, proc.tail
    assert "its files pass the checks (sizes, SHA-256, weights-only scan)" in text
    assert "[dbot]   from step 2: 22 steps left" in text
    assert config_block(text) == (out / "config.yaml").read_text().rstrip("\n")    # the text config.yaml holds


@pytest.mark.slow
def test_missing_shards_exit_2_with_the_error_a_start_gives(tmp_path):
    args = COMMON + [f"data.shards={tmp_path / 'nowhere'}", "data.synthetic_num=0", f"run.out_dir={tmp_path / 'run'}"]
    dry = dry_run(args, expect_rc=2)
    start = launch_pretrain(0, args, expect_rc=2)

    def errors(proc) -> list[str]:
        return [line for line in proc.stderr.splitlines() if line.startswith("dbot-pretrain:")]
    assert errors(dry) == errors(start) == [
        f"dbot-pretrain: config error: data.shards={tmp_path / 'nowhere'} does not exist; point it at your shards, or "
        "make test shards with `dbot-shards synthetic --out DIR --num N`"], dry.tail


@pytest.mark.slow
def test_vit_h_dry_run_on_a_cpu_plans_memory_and_time_for_a_card(tmp_path, shards):
    """The issue's done-criterion: `dbot-pretrain --preset vit_h --dry-run data.shards=...` on a CPU, no model built
    at ViT-H size (the memory and time models count parameters on the meta device)."""
    out = tmp_path / "vit_h"
    proc = run([sys.executable, "-c", PROBE, "--preset", "vit_h", "--dry-run", "--card", "A100",
                f"data.shards={shards}", f"run.out_dir={out}", "optim.precision=bf16", "data.resampled=true"])
    assert proc.returncode == 0, proc.tail
    text = proc.stdout
    assert "probe: rc=0 deepspeed_comm=False engines=0" in text and not out.exists()
    assert "[dbot] data: 4 shards, 1281167 samples (count from data.num_samples)" in text
    assert "an epoch of 1281167 samples is 312 steps" in text                   # 1281167 // 4096
    assert "[dbot]   stage 0: steps 0-249599 (249600 steps, 800 epochs), teacher depth 0; LR warmup 12480 steps (40 " \
           "epochs)" in text
    assert "(1 rank(s) x micro-batch 128 x 32 accumulation)" in text
    assert "[dbot] memory per GPU (dbot-plan --arch vit_huge_patch14 --img-size 224 --zero 2 --world 1 --micro-batch " \
           "128" in text
    assert "[dbot] time (A100 at MFU 0.4, 1 GPU(s), dbot-plan --time's model): a step takes stage 0 " in text
    assert " days (" in text


@pytest.mark.slow
def test_two_ranks_each_check_their_own_share_and_rank_0_prints_once(tmp_path, shards):
    out = tmp_path / "run"
    proc = launch_pretrain(2, TINY + ["--dry-run", f"data.shards={shards}", f"run.out_dir={out}",
                                      "schedule.stage_steps=[4,4]", "data.resampled=false"])
    text = proc.stdout
    assert text.count("[dbot] config (the config.yaml this run writes):") == 1
    assert text.count("[dbot] dry run passed: the same command without --dry-run would train (2 rank(s))") == 1
    assert "[dbot]   rank 0 reader 0: 128 samples of epoch 0 in 2 shard(s)" in text, proc.tail
    assert "[dbot]   rank 1 reader 1: 128 samples of epoch 0 in 2 shard(s)" in text, proc.tail
    assert "(2 rank(s) x micro-batch 8 x 1 accumulation)" in text
    assert not out.exists()
