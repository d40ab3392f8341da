"""ch05/initialisation.py: the three initialisations run the ch05 training and are reported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts a subprocess (a script, a benchmark or torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_initialisation_script_reports_every_scheme_and_seed(tmp_path):
    out = tmp_path / "initialisation.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "ch05" / "initialisation.py"), "--quick", "--epochs", "1", "--seeds", "1", "2",
         "--device", "cpu", "--out-dir", str(tmp_path)],  # --quick: a tiny model, same code
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(run["scheme"], run["seed"]): run for run in report["runs"]}
    assert set(runs) == {(s, seed) for s in ("gpt2", "pytorch", "gpt2_embeddings_n01") for seed in (1, 2)}
    for run in runs.values():
        assert len(run["train_loss_per_epoch"]) == 1 and run["eval_steps"][0] == 0
        assert run["train_losses"][-1] < run["train_losses"][0]  # every scheme learns something
    # The same seed gives the same data order, so only the initial weights differ between schemes.
    assert runs[("gpt2", 1)]["train_losses"][0] != runs[("pytorch", 1)]["train_losses"][0]
    assert "| pytorch | 2 |" in result.stdout


def test_initialisation_script_refuses_zero_epochs(tmp_path):
    env = {**os.environ, "LLMS_QUICK": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "ch05" / "initialisation.py"), "--epochs", "0", "--out-dir", str(tmp_path / "x")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--epochs must be at least 1" in result.stderr


def test_initialisation_script_writes_a_run_folder_by_default_not_the_committed_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    committed = (ROOT / "ch05" / "initialisation.json").read_bytes()
    result = subprocess.run(
        [sys.executable, str(ROOT / "ch05" / "initialisation.py"), "--quick", "--epochs", "1", "--schemes", "gpt2",
         "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(tmp_path.glob("runs/initialisation-*/initialisation.json"))
    assert len(written) == 1 and (ROOT / "ch05" / "initialisation.json").read_bytes() == committed
