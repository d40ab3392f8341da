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


def run_benchmark(name: str, tmp_path: Path, timeout: float = 180) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "LLMS_QUICK": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
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


def test_pretrain_benchmark_reports_memory_speed_and_ddp(tmp_path):
    pytest.importorskip("llms_from_scratch")
    result, stdout = run_benchmark("pretrain", tmp_path, timeout=600)
    assert "| corpus |" in stdout
    assert result["quick"] is True
    assert [row["scale"] for row in result["memory"]] == [1, 4]
    for row in result["memory"]:
        assert row["prepare_mb_per_s"] > 0 and row["tokens"] > 0
        assert row["prepare_peak_rss_mb"] > 0 and row["train_peak_rss_mb"] > 0 and row["book_peak_rss_mb"] > 0
    assert result["speed"]["ours_tokens_per_s"] > 0 and result["speed"]["book_tokens_per_s"] > 0
    assert result["ddp"]["ddp"]["ranks_identical"] is True and result["ddp"]["single"]["ms_per_step"] > 0
    assert (tmp_path / "pretrain_memory.png").is_file()
