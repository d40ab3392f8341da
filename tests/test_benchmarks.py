"""Smoke runs of the benchmark scripts in quick mode: they run and write the promised JSON.

Timings are never asserted; only that every number is there and positive.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(name: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "LLMS_QUICK": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_tokenizer_benchmark_reports_throughput_and_training_times(tmp_path):
    result, _ = run_benchmark("tokenizer", tmp_path)
    assert result["encode"]["ours_mb_per_s"] > 0
    assert result["encode"]["tiktoken_mb_per_s"] > 0
    assert result["encode"]["ids_match"] is True
    assert {row["vocab_size"] for row in result["train"]} == {512, 1000, 4096}
    assert all(row["seconds"] > 0 for row in result["train"])


def test_attention_benchmark_reports_every_implementation(tmp_path):
    report, stdout = run_benchmark("attention", tmp_path)
    assert "| implementation" in stdout
    assert report["benchmark"] == "attention"
    assert report["config"]["quick"] is True
    assert {"batch", "tokens", "d_model", "num_heads", "rounds"} <= report["config"].keys()
    assert "gpu" in report
    names = {row["name"] for row in report["results"]}
    assert {"single-head wrapper", "split heads, explicit mask", "shared (SDPA)"} <= names
    for row in report["results"]:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        assert row["forward_vs_shared"] > 0 and row["forward_backward_vs_shared"] > 0


def test_model_benchmark_reports_training_and_generation(tmp_path):
    pytest.importorskip("transformers")
    result, _ = run_benchmark("model", tmp_path)
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


def test_train_benchmark_checks_equal_losses_and_reports_both_loops(tmp_path):
    pytest.importorskip("llms_from_scratch")
    result, stdout = run_benchmark("train", tmp_path)
    assert "| training loop" in stdout
    assert result["benchmark"] == "train" and result["quick"] is True
    check = result["check"]
    assert len(check["book"]) == check["steps"] == len(check["ours_with_make_optimizer"])
    assert check["max_abs_diff_same_optimizer"] < 1e-4 and check["same_within_1e-4"] is True
    rates = result["timing"]["tokens_per_s"]
    assert rates["ours"] > 0 and rates["book"] > 0 and result["speedup"] > 0
    assert result["timing"]["params"]["ours"] == result["timing"]["params"]["book"]
