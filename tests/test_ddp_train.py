"""Appendix A: the toy network, gradient accumulation, and data-parallel training with torchrun."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from shared import distributed

# Every test here starts a subprocess (a script, a benchmark or torchrun).
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "appendix_A" / "ddp_train.py"


def _load_script():
    # The script is a file to launch, not part of an installed package, so load it by path.
    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ddp_train = _load_script()


# --- the toy network and its training -------------------------------------------------------


def test_network_for_50_inputs_and_3_outputs_has_2213_parameters():
    model = ddp_train.NeuralNetwork(num_inputs=50, num_outputs=3)
    # (50*30 + 30) + (30*20 + 20) + (20*3 + 3)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2213


def test_toy_data_is_balanced_and_repeatable():
    features, labels = ddp_train.make_toy_data(10, seed=5)
    again, _ = ddp_train.make_toy_data(10, seed=5)
    assert features.shape == (10, 2)
    assert labels.tolist() == [0, 1] * 5
    assert torch.equal(features, again)
    with pytest.raises(ValueError, match="at least 2"):
        ddp_train.make_toy_data(1)


def test_toy_dataset_rejects_features_and_labels_of_different_lengths():
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        ddp_train.ToyDataset(torch.zeros(3, 2), torch.zeros(2))


def test_toy_training_in_one_process_reaches_accuracy_one(tmp_path, monkeypatch, capsys):
    for name in distributed.LAUNCH_VARIABLES:  # a plain start, whatever the test runner's environment
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLMS_DEVICE", "cpu")
    facts = ddp_train.main(["--out-dir", str(tmp_path)])
    assert facts["world_size"] == 1 and facts["backend"] == "gloo"
    assert facts["train_accuracy"] == 1.0
    assert facts["test_accuracy"] == 1.0
    assert "train accuracy 1.00 | test accuracy 1.00" in capsys.readouterr().out
    # The session tore the process group down again.
    assert not torch.distributed.is_initialized()
    assert json.loads((tmp_path / "rank0.json").read_text())["parameter_sha256"] == facts["parameter_sha256"]


def test_script_rejects_a_batch_size_no_process_could_fill(tmp_path, monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLMS_DEVICE", "cpu")
    with pytest.raises(ValueError, match="gets 4 of the 4 samples, fewer than --batch-size 8"):
        ddp_train.main(["--num-samples", "4", "--batch-size", "8", "--out-dir", str(tmp_path)])
    assert not torch.distributed.is_initialized()


def test_script_rejects_a_batch_size_that_micro_batches_do_not_divide(capsys):
    with pytest.raises(SystemExit):
        ddp_train.parse_args(["--batch-size", "4", "--accumulation-steps", "3"])
    assert "must be a multiple of --accumulation-steps" in capsys.readouterr().err


# --- gradient accumulation -------------------------------------------------------------------


def _one_step(features, labels, accumulation_steps):
    torch.manual_seed(0)
    model = ddp_train.NeuralNetwork(num_inputs=2, num_outputs=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = ddp_train.train_step(model, optimizer, features, labels, accumulation_steps)
    return model, loss


@pytest.mark.parametrize(("batch_size", "accumulation_steps"), [(8, 2), (8, 4), (8, 8), (7, 3)])
def test_gradient_accumulation_matches_one_big_batch(batch_size, accumulation_steps):
    features, labels = ddp_train.make_toy_data(batch_size, seed=1)
    big, big_loss = _one_step(features, labels, accumulation_steps=1)
    accumulated, accumulated_loss = _one_step(features, labels, accumulation_steps)
    assert accumulated_loss == pytest.approx(big_loss, abs=1e-6)
    for (name, p_big), p_acc in zip(big.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p_acc.grad, p_big.grad, atol=1e-6, rtol=0, msg=f"gradient of {name}")
        torch.testing.assert_close(p_acc, p_big, atol=1e-6, rtol=0, msg=f"updated {name}")


def test_train_step_rejects_more_micro_batches_than_samples():
    features, labels = ddp_train.make_toy_data(2)
    with pytest.raises(ValueError, match="between 1 and the batch size \\(2\\), got 3"):
        _one_step(features, labels, accumulation_steps=3)


# --- data-parallel training with torchrun on the CPU -----------------------------------------

NUM_SAMPLES, BATCH_SIZE, ACCUMULATION_STEPS, EPOCHS, LR, SEED = 16, 2, 2, 3, 0.5, 123


@pytest.fixture(scope="module")
def torchrun_two_processes(tmp_path_factory):
    """One real 2-process run on the CPU, shared by the tests below."""
    facts_dir = tmp_path_factory.mktemp("ddp-facts")
    # This checkout's shared package, and the CPU even where there are GPUs.
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, LLMS_DEVICE="cpu", PYTHONPATH=python_path)
    args = ["--out-dir", facts_dir, "--num-samples", NUM_SAMPLES, "--batch-size", BATCH_SIZE]
    args += ["--accumulation-steps", ACCUMULATION_STEPS, "--epochs", EPOCHS, "--lr", LR, "--seed", SEED]
    # Kills torchrun and both workers if anything hangs, so a failure never leaves processes behind.
    result = distributed.launch_torchrun(SCRIPT, args, nproc_per_node=2, timeout=120, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stdout
    facts = [json.loads((facts_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    weights = [torch.load(facts_dir / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    return result.stdout, facts, weights


def test_torchrun_uses_two_gloo_processes_and_reaches_accuracy_one(torchrun_two_processes):
    _, facts, _ = torchrun_two_processes
    assert [f["rank"] for f in facts] == [0, 1]
    for rank_facts in facts:
        assert rank_facts["world_size"] == 2
        assert rank_facts["backend"] == "gloo"
        assert rank_facts["train_accuracy"] == 1.0
        assert rank_facts["test_accuracy"] == 1.0


def test_torchrun_ranks_end_with_identical_parameters(torchrun_two_processes):
    _, facts, (rank0, rank1) = torchrun_two_processes
    assert facts[0]["parameter_sha256"] == facts[1]["parameter_sha256"]
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_torchrun_ranks_see_disjoint_halves_reshuffled_every_epoch(torchrun_two_processes):
    _, facts, _ = torchrun_two_processes
    orders = []
    for epoch in range(EPOCHS):
        seen = [[i for batch in f["batches_per_epoch"][epoch] for i in batch] for f in facts]
        assert all(len(indices) == NUM_SAMPLES // 2 for indices in seen)
        assert set(seen[0]).isdisjoint(seen[1])
        assert set(seen[0]) | set(seen[1]) == set(range(NUM_SAMPLES))
        orders.append(seen[0])
    # set_epoch gives every epoch a new permutation.
    assert orders[0] != orders[1] != orders[2]


def test_torchrun_prints_from_rank_zero_only(torchrun_two_processes):
    output, _, _ = torchrun_two_processes
    assert len(re.findall(r"^epoch +1/3", output, flags=re.MULTILINE)) == 1
    assert output.count("train accuracy 1.00 | test accuracy 1.00") == 1


def test_torchrun_training_equals_one_process_on_the_combined_batches(torchrun_two_processes):
    """DDP averages the two processes' gradients, so each step (accumulated over micro-batches
    under no_sync) equals one plain step on both processes' batches at once."""
    _, facts, (ddp_weights, _) = torchrun_two_processes
    torch.manual_seed(SEED)
    model = ddp_train.NeuralNetwork(num_inputs=2, num_outputs=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    features, labels = ddp_train.make_toy_data(NUM_SAMPLES, seed=SEED)
    for epoch in range(EPOCHS):
        for batch0, batch1 in zip(
            facts[0]["batches_per_epoch"][epoch], facts[1]["batches_per_epoch"][epoch], strict=True
        ):
            combined = batch0 + batch1
            ddp_train.train_step(model, optimizer, features[combined], labels[combined])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ddp_weights[name], atol=1e-6, rtol=0, msg=name)


def test_without_out_dir_each_run_writes_a_new_run_folder(tmp_path, monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ddp_train, "HERE", tmp_path)
    for _ in range(2):
        ddp_train.main(["--device", "cpu", "--epochs", "1"])
    runs = sorted((tmp_path / "runs" / "ddp_train").iterdir())
    assert len(runs) == 2 and all((run / "rank0.json").is_file() for run in runs)
    assert json.loads((runs[0] / "rank0.json").read_text())["device"] == "cpu"
