"""Smoke test: benchmarks/model.py runs in quick mode and writes the promised JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_model_benchmark_quick_run_writes_results(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "model.json"
    env = {**os.environ, "LLMS_QUICK": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "model.py"), "--out", str(out)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["matmul_peak_flops"] > 0
    rows = {(r["model"], r["adamw"]): r for r in result["training"]}
    for model in ("ours", "hf"):
        for adamw in ("default", "fused"):
            row = rows[(model, adamw)]
            assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["vs_hf"] is not None
    generation = {r["model"]: r for r in result["generation"]["rows"]}
    assert {"ours (KV cache)", "ours (no cache)", "hf generate (cache)"} <= set(generation)
    assert result["generation"]["hf_same_tokens"] is True
