"""`dbot-bench matmul`: both dtypes measured, and what auto's detection sees, as one JSON line."""
from __future__ import annotations

import json

from dbot_ds.bench.cli import cli


def test_matmul_reports_both_dtypes_and_auto_s_view(capsys, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")          # what auto must then call emulated
    assert cli(["matmul", "--shape", "64", "32", "32", "--seconds", "0.05"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["shape"] == [64, 32, 32] and row["fp32_gflops"] > 0 and row["bf16_gflops"] > 0
    assert row["auto_sees_native_bf16"] is False and "ONEDNN_MAX_CPU_ISA=AVX2" in row["why"]
