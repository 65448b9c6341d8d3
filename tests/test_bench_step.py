"""dbot-bench step on a tiny model on the CPU: fields present and self-consistent (nothing timed or asserted
about speed)."""
import json
import sys

import pytest

from conftest import run


# The ZeRO-2 step with --baseline runs in tests/test_gpu_check.py (through dbot-bench sweep), with these checks.
@pytest.mark.parametrize("extra", [["--zero", "zero3", "--teacher", "zero3", "--ckpt", "1", "--teacher-depth", "0"]])
def test_bench_step_fields_are_consistent(extra):
    proc = run([sys.executable, "-m", "dbot_ds.bench", "step", "--arch", "vit_tiny_patch4", "--micro-batch", "8",
                "--steps", "3", "--warmup", "1", "--peak-tflops", "2.0"] + extra)
    assert proc.returncode == 0, proc.tail
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("arch", "micro_batch", "img_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_mem_gib", "split_s"):
        assert key in r
    assert r["arch"] == "vit_tiny_patch4" and r["micro_batch"] == 8 and r["peak_tflops"] == 2.0
    assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 2.0)
    assert r["img_per_s_per_gpu"] * r["step_s"] == pytest.approx(8)
    assert r["tflops_per_gpu"] == pytest.approx(r["img_per_s_per_gpu"] * r["gflops_per_image"] / 1e3)
    split = r["split_s"]
    assert sum(split.values()) <= r["step_s"] * 1.5 and all(v >= 0 for v in split.values())
    assert r["peak_mem_gib"] > 0
    if "--baseline" in extra:
        assert r["speedup"] == pytest.approx(r["img_per_s_per_gpu"] / r["baseline_img_per_s_per_gpu"])
    else:
        assert r["teacher_depth"] == 0 and r["zero"] == "zero3" and r["act_ckpt_every"] == 1
