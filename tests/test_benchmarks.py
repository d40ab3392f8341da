"""Smoke runs of the benchmark scripts in quick mode: they run and write the promised JSON.

Timings are never asserted; only that every number is there and positive.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts a subprocess (a script, a benchmark or torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


# Scripts that take --out-dir (a folder; the report is <folder>/<name>.json) instead of --out FILE.
OUT_DIR_SCRIPTS = {"pretrain", "train", "profile_step"}


def _out_flags(name: str, tmp_path: Path) -> list[str]:
    return ["--out-dir", str(tmp_path)] if name in OUT_DIR_SCRIPTS else ["--out", str(tmp_path / f"{name}.json")]


def run_benchmark(name: str, tmp_path: Path, timeout: float = 180) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "LLMS_QUICK": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *_out_flags(name, tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # One environment record, written by benchmarks/common.py, in every report.
    assert ENVIRONMENT_KEYS <= report["environment"].keys()
    assert report["environment"]["versions"]["torch"] and report["environment"]["torch_threads"] >= 1
    return report, result.stdout


ENVIRONMENT_KEYS = {"python", "versions", "platform", "cpu", "cpu_count", "torch_threads", "device", "quick"}


def _load_common():
    # benchmarks/ is a folder of scripts, not a package: load its helper module by path.
    spec = importlib.util.spec_from_file_location("benchmarks_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timing_interleaves_candidates_sets_each_up_per_round_and_drops_the_warm_up():
    common = _load_common()
    calls = []

    def candidate(name):
        def setup():
            calls.append(f"setup {name}")
            return lambda: calls.append(name)

        return setup

    samples = common.time_interleaved({"a": candidate("a"), "b": candidate("b")}, rounds=2, steps=3)
    one_round = ["setup a", "a", "a", "a", "setup b", "b", "b", "b"]
    assert calls == one_round * 3  # a warm-up round, then two recorded rounds
    assert {name: len(values) for name, values in samples.items()} == {"a": 2, "b": 2}
    assert all(seconds >= 0 for values in samples.values() for seconds in values)


def test_tokenizer_benchmark_reports_throughput_and_training_times(tmp_path):
    result, _ = run_benchmark("tokenizer", tmp_path)
    assert result["encode"]["ours"]["mb_per_s"] > 0
    assert result["encode"]["tiktoken"]["mb_per_s"] > 0
    assert result["encode"]["ids_match"] is True
    assert {row["vocab_size"]: row["reached"] for row in result["train"]} == {
        512: 512,
        1000: 1000,
        4096: 2774,
    }
    assert all(row["median_s"] > 0 for row in result["train"])


def test_attention_benchmark_reports_every_implementation(tmp_path):
    report, stdout = run_benchmark("attention", tmp_path)
    assert "| implementation" in stdout
    assert report["benchmark"] == "attention"
    assert report["environment"]["quick"] is True
    assert {"batch", "tokens", "d_model", "num_heads", "rounds", "steps"} <= report["config"].keys()
    assert "gpu" in report
    names = {row["name"] for row in report["results"]}
    assert {"single-head wrapper", "split heads, explicit mask", "shared (SDPA)"} <= names
    for row in report["results"]:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        assert row["forward_vs_shared"] > 0 and row["forward_backward_vs_shared"] > 0


def test_model_benchmark_reports_training_and_generation(tmp_path):
    pytest.importorskip("transformers")
    result, _ = run_benchmark("model", tmp_path)
    assert result["environment"]["quick"] is True
    assert result["matmul_peak_flops"] > 0
    rows = {(r["model"], r["adamw"]): r for r in result["training"]}
    for model in ("ours", "hf"):
        for adamw in ("default", "fused"):
            row = rows[(model, adamw)]
            assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["vs_hf"] is not None
    generation = {r["model"]: r for r in result["generation"]["rows"]}
    assert {"ours (KV cache)", "ours (no cache)", "hf generate (cache)"} <= set(generation)
    assert result["generation"]["hf_same_tokens"] is True


def test_classify_benchmark_reports_both_loops_and_the_ratio(tmp_path):
    pytest.importorskip("llms_from_scratch")
    result, stdout = run_benchmark("classify", tmp_path)
    assert "| book `train_classifier_simple`" in stdout
    assert result["quick"] is True
    assert result["max_logit_difference_before_training"] < 1e-3  # the same weights in both models
    for side in ("book", "ours"):
        assert result[f"{side}_seconds"] > 0
        assert 0 <= result[f"{side}_test_acc"] <= 1
    assert result["speedup"] > 0
    # Dynamic padding trains on fewer (padded) tokens than padding everything to the longest message.
    assert result["rounds"][0]["ours"]["train_tokens"] < result["rounds"][0]["book"]["train_tokens"]


def test_generate_responses_benchmark_reports_each_share_with_the_same_tokens(tmp_path):
    pytest.importorskip("llms_from_scratch")
    report, stdout = run_benchmark("generate_responses", tmp_path)
    assert "| run |" in stdout
    assert report["benchmark"] == "generate_responses" and report["environment"]["quick"] is True
    runs = {row["run"]: row for row in report["results"]}
    assert len(runs) == 4 and any(name.startswith("book") for name in runs)
    for row in runs.values():
        assert row["seconds"] > 0 and row["speedup_vs_book"] > 0
        assert row["same_tokens"] is True  # every approach generates exactly the same tokens
    assert all(value > 0 for value in report["shares"].values())


def test_pretrain_benchmark_reports_memory_speed_and_ddp(tmp_path):
    pytest.importorskip("llms_from_scratch")
    result, stdout = run_benchmark("pretrain", tmp_path, timeout=600)
    assert "| corpus |" in stdout
    assert result["environment"]["quick"] is True
    assert [row["scale"] for row in result["memory"]] == [1, 4]
    for row in result["memory"]:
        assert row["prepare_mb_per_s"] > 0 and row["tokens"] > 0
        assert row["prepare_peak_rss_mb"] > 0 and row["train_peak_rss_mb"] > 0 and row["book_peak_rss_mb"] > 0
    assert result["speed"]["ours_tokens_per_s"] > 0 and result["speed"]["book_tokens_per_s"] > 0
    assert result["ddp"]["ddp"]["ranks_identical"] is True and result["ddp"]["single"]["ms_per_step"] > 0
    assert (tmp_path / "pretrain_memory.png").is_file()


def test_train_benchmark_checks_equal_losses_and_reports_both_loops(tmp_path):
    pytest.importorskip("llms_from_scratch")
    result, stdout = run_benchmark("train", tmp_path)
    assert "| training loop" in stdout
    assert result["benchmark"] == "train" and result["quick"] is True
    check = result["check"]
    assert len(check["book"]) == check["steps"] == len(check["ours_with_make_optimizer"])
    assert check["max_abs_diff_same_optimizer"] < 1e-4 and check["same_within_1e-4"] is True
    assert check["max_abs_diff_bf16_autocast"] < 0.05 and check["bf16_within_0.05"] is True
    rates = result["timing"]["tokens_per_s"]
    assert set(rates) == {"ours", "ours_bf16", "book"}  # no compile column unless asked
    assert all(rate > 0 for rate in rates.values()) and result["speedup"] > 0
    assert result["speedups"]["ours_bf16"] > 0
    assert result["timing"]["params"]["ours"] == result["timing"]["params"]["book"]


def test_profile_step_benchmark_reports_the_matrix_products_share_and_rates(tmp_path):
    result, stdout = run_benchmark("profile_step", tmp_path)
    step = result["step"]
    assert step["step_s"] > 0 and 0 < step["matrix_products_share"] < 1
    assert step["matrix_products_gflops"] > 0 and "aten::mm" in step["top_ops_share"]
    assert set(result["matmul"]["gflops"]) == {"float32", "bfloat16"}
    assert all(rate > 0 for rate in result["matmul"]["gflops"].values())
    assert "one training step:" in stdout
