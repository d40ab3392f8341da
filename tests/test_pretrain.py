"""ch05/pretrain.py and ch05/generate.py: exact resume after SIGKILL, checkpoint safety, DDP, outputs.

Runs that are compared bit for bit run as subprocesses with one thread each, so that they do
the same floating-point work whatever the test process has set.
"""

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import run_process_tree
from safetensors.torch import load_file

from shared import distributed
from shared.checkpoint import read_checkpoint, step_checkpoints
from shared.data import load_the_verdict
from shared.model import GPTModel
from shared.weights import load_hf_gpt2, save_hf_gpt2

# Every test here starts a subprocess (a script, a benchmark or torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN, GENERATE = ROOT / "ch05" / "pretrain.py", ROOT / "ch05" / "generate.py"
MEASURED_RUN = ROOT / "benchmarks" / "pretrain.py"  # pretrain.py plus per-process parameter digests
STEPS, EVERY = 60, 20
# Dropout on: resuming must also replay the random numbers.
COMMON = ["--quick", "--device", "cpu", "--max-steps", STEPS, "--batch-size", 2, "--context-length", 16, "--lr", 1e-3,
          "--seed", 5, "--dropout", 0.1, "--eval-interval", EVERY, "--eval-batches", 2, "--log-interval", 10,
          "--checkpoint-every", EVERY, "--keep-checkpoints", 3, "--no-progress"]  # fmt: skip


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain, generate_script = _load(PRETRAIN, "pretrain"), _load(GENERATE, "generate_script")


def _env():
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)


def _args(data, checkpoints, out, *extra):
    return [*map(str, ["--data", data, *COMMON, "--checkpoint-dir", checkpoints, "--out-dir", out, *extra])]


def run_script(args, timeout=240):
    result = run_process_tree([sys.executable, PRETRAIN, *args], timeout=timeout, cwd=ROOT, env=_env())
    return result


def weights(out):
    return load_file(Path(out) / "model.safetensors")


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    text = load_the_verdict()
    half = len(text) // 2
    (folder / "part1.txt").write_text(text[:half])
    (folder / "part2.txt").write_text(text[half:])
    return folder


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    result = run_script(_args(corpus, base / "ckpt", base / "out"))
    assert result.returncode == 0, result.stdout
    return base, result.stdout


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_writes_model_loss_log_plot_and_keeps_the_last_checkpoints(uninterrupted):
    base, output = uninterrupted
    assert "tokens/s" in output and "val loss" in output
    out = base / "out"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "loss_log.csv", "loss.png", "summary.json"}
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert [int(r["step"]) for r in rows] == [20, 40, 60]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) < 11  # it learns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["tokens_seen"] == STEPS * 2 * 16 and summary["tokens_per_s"] > 0
    assert [p.name for p in step_checkpoints(base / "ckpt")] == [
        "step_00000020.pt", "step_00000040.pt", "step_00000060.pt"
    ]  # fmt: skip


def test_run_killed_with_sigkill_and_resumed_ends_bitwise_equal(corpus, uninterrupted, tmp_path):
    checkpoints, out = tmp_path / "ckpt", tmp_path / "out"
    args = _args(corpus, checkpoints, out)
    process = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *args], cwd=ROOT, env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (checkpoints / "step_00000020.pt").exists():
            assert process.poll() is None, "the run ended before writing its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed: nothing tested"

    result = run_script([*args, "--resume"])
    assert result.returncode == 0, result.stdout
    assert "resuming from" in result.stdout
    assert_same_weights(out, uninterrupted[0] / "out")
    # The loss log of the resumed run is the uninterrupted one's.
    assert (out / "loss_log.csv").read_text() == (uninterrupted[0] / "out" / "loss_log.csv").read_text()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(corpus, uninterrupted, tmp_path):
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(uninterrupted[0] / "ckpt", checkpoints)
    (checkpoints / "step_00000060.pt").unlink()
    latest = checkpoints / "step_00000040.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated, as by a full disk
    result = run_script([*_args(corpus, checkpoints, tmp_path / "out"), "--resume"])
    assert result.returncode == 0, result.stdout
    assert "step_00000040.pt" in result.stdout and "falling back to the previous checkpoint" in result.stdout
    assert "resuming from" in result.stdout and "step_00000020.pt" in result.stdout
    assert_same_weights(tmp_path / "out", uninterrupted[0] / "out")


def test_a_failed_save_never_replaces_a_good_checkpoint(corpus, uninterrupted, tmp_path, monkeypatch, one_thread):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    shutil.copy(uninterrupted[0] / "ckpt" / "step_00000020.pt", checkpoints)
    good = (checkpoints / "step_00000020.pt").read_bytes()
    # A temporary file left by a run killed mid-save: ignored, then cleaned up.
    (checkpoints / ".step_00000040.pt.abc123.part").write_bytes(b"half a checkpoint")

    import shared.checkpoint

    def crash_while_writing(obj, file, *args, **kwargs):
        file.write(b"the first bytes of a checkpoint")
        raise KeyboardInterrupt("interrupted while saving")

    monkeypatch.setattr(shared.checkpoint.torch, "save", crash_while_writing)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main([*_args(corpus, checkpoints, tmp_path / "out"), "--resume"])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000020.pt"]
    assert (checkpoints / "step_00000020.pt").read_bytes() == good
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [(["--lr", "0.002"], "lr: checkpoint 0.001, now 0.002"), (["--dropout", "0.2"], "drop_rate"),
     (["--batch-size", "4"], "batch_size: checkpoint 2, now 4")],
)  # fmt: skip
def test_checkpoint_from_a_different_run_is_refused(corpus, uninterrupted, tmp_path, capsys, change, message):
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(uninterrupted[0] / "ckpt", checkpoints)
    args = _args(corpus, checkpoints, tmp_path / "out")
    index = args.index(change[0])
    args[index + 1] = change[1]
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*args, "--resume"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "belongs to a different run" in error and message in error


def test_checkpoint_from_a_different_corpus_is_refused(corpus, uninterrupted, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    (other / "part3.txt").write_text("One more book. " * 200)
    shutil.copytree(uninterrupted[0] / "ckpt", tmp_path / "ckpt")
    with pytest.raises(SystemExit):
        pretrain.main([*_args(other, tmp_path / "ckpt", tmp_path / "out"), "--resume"])
    assert "corpus: checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "message"),
    [(["--min-lr", "1", "--lr", "1e-3"], "min_lr <= peak_lr"), (["--grad-clip", "-1"], "--grad-clip and --weight-decay"),
     (["--lr", "nan"], "peak_lr must be a finite number"), (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
     (["--warmup-steps", "5000"], "warmup_steps <= total_steps")],
)  # fmt: skip
def test_bad_training_arguments_are_refused_before_the_corpus_is_read(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--data", str(tmp_path / "no-such-corpus"), "--quick", *bad])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "no-such-corpus" not in error


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(corpus, tmp_path, capsys):
    args = _args(corpus, tmp_path / "ckpt", tmp_path / "out")
    for name, value in (("--lr", "1e30"), ("--checkpoint-every", "1"), ("--log-interval", "100")):
        args[args.index(name) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*args, "--warmup-steps", "0"])
    assert exit_info.value.code == 2 and "the training loss became" in capsys.readouterr().err
    kept = step_checkpoints(tmp_path / "ckpt")
    assert kept and all(torch.isfinite(t).all() for t in read_checkpoint(kept[-1])["model"].values())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_full_disk_for_the_output_is_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    import shared.weights

    def full(tensors, path, metadata=None):  # how safetensors reports a full disk
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")

    monkeypatch.setattr(shared.weights, "save_file", full)
    args = _args(corpus, tmp_path / "ckpt", tmp_path / "out")
    args[args.index("--max-steps") + 1] = "2"
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(args)
    assert exit_info.value.code == 2 and f"the disk holding {tmp_path / 'out'} is full: the run's model" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_unwritable_checkpoint_folder_is_reported_before_training(corpus, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        pretrain.main(_args(corpus, blocker / "ckpt", tmp_path / "out"))
    assert "cannot write to the checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_corpus_smaller_than_one_window_is_refused(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("Far too short for any window. " * 3)
    with pytest.raises(SystemExit):
        pretrain.main(["--data", str(tmp_path / "tiny.txt"), "--quick", "--device", "cpu", "--context-length", "64",
                       "--max-steps", "1", "--out-dir", str(tmp_path / "out")])  # fmt: skip
    assert "too small for a context length of 64" in capsys.readouterr().err


def test_output_loads_in_shared_weights_and_transformers_with_the_same_logits(uninterrupted):
    out = uninterrupted[0] / "out"
    model = load_hf_gpt2(out)
    ids = torch.tensor([[40, 1807, 3619, 402, 271, 10899, 2138, 257]])
    with torch.no_grad():
        ours = model(ids)
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_init_from_a_local_folder_starts_from_its_weights(corpus, tmp_path, one_thread):
    torch.manual_seed(0)
    save_hf_gpt2(GPTModel({**pretrain.PRESETS["quick"], "context_length": 32}), tmp_path / "base")
    common = ["--data", str(corpus), "--init-from", str(tmp_path / "base"), "--context-length", "16",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    pretrain.main([*common, "--max-steps", "0", "--out-dir", str(tmp_path / "out")])
    assert_same_weights(tmp_path / "out", tmp_path / "base")
    model, summary = pretrain.main([*common, "--max-steps", "3", "--warmup-steps", "1", "--out-dir", str(tmp_path / "3")])
    assert summary["steps"] == 3 and model.cfg["context_length"] == 32


def test_the_default_output_is_a_new_run_folder_and_quick_is_the_tiny_preset():
    args = pretrain.parse_args(["--data", "corpus", "--quick"])
    assert args.out_dir.parent == Path("runs") and args.out_dir.name.startswith("pretrain-")
    assert args.preset == "quick" and pretrain.parse_args(["--data", "corpus"]).preset == "gpt2-small"


# --- data-parallel training with torchrun -----------------------------------------------------


def test_torchrun_two_processes_identical_weights_and_resume(corpus, tmp_path):
    def launch(checkpoints, out, *extra):
        args = _args(corpus, checkpoints, out, *extra)
        args[args.index("--max-steps") + 1] = "30"
        args[args.index("--checkpoint-every") + 1] = "10"
        result = distributed.launch_torchrun(
            MEASURED_RUN, ["--measure-run", *args], nproc_per_node=2, timeout=300, cwd=ROOT, env=_env()
        )
        assert result.returncode == 0, result.stdout
        return result.stdout

    output = launch(tmp_path / "ckpt", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 30 * 2 * 2 * 16
    first, second = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["parameter_sha256"] == second["parameter_sha256"]  # both copies of the model are bit-identical
    assert output.count("step     30: train loss") == 1  # rank 0 alone logs

    # Resume from step 10 under DDP: the same final weights as the uninterrupted DDP run.
    resumed = tmp_path / "ckpt-resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "ckpt" / "step_00000010.pt", resumed)
    output = launch(resumed, tmp_path / "out-resumed", "--resume")
    assert "resuming from" in output and "step_00000010.pt" in output
    assert_same_weights(tmp_path / "out-resumed", tmp_path / "out")


# --- generation --------------------------------------------------------------------------------


def test_generate_loads_the_output_folder_and_a_checkpoint_alike(uninterrupted, capsys):
    base = uninterrupted[0]
    from_folder = generate_script.load_model(base / "out")
    from_checkpoint = generate_script.load_model(base / "ckpt")  # the newest step_<N>.pt
    ids = torch.tensor([[40, 1807, 3619]])
    with torch.no_grad():
        torch.testing.assert_close(from_folder(ids), from_checkpoint(ids))
    model = ["--model", str(base / "out"), "--device", "cpu", "--prompt", "I had", "--max-new-tokens", "5"]
    texts = generate_script.main(model)
    assert len(texts) == 1 and capsys.readouterr().out.startswith("I had")
    sampling = ["--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    sampled, again = generate_script.main([*model, *sampling]), generate_script.main([*model, *sampling])
    assert sampled == again


def test_generate_interactive_answers_each_line(uninterrupted, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("I had\n\nThe picture\n"))
    texts = generate_script.main(["--model", str(uninterrupted[0] / "out"), "--device", "cpu", "--interactive",
                                  "--beams", "2", "--max-new-tokens", "4"])  # fmt: skip
    assert len(texts) == 2
    out = capsys.readouterr().out
    # Each answer is printed as the prompt followed by its continuation; the empty line is skipped.
    assert "I had" + texts[0] in out and "The picture" + texts[1] in out


def test_generate_writes_its_texts_to_out_dir_and_exits_non_zero_after_an_error(uninterrupted, tmp_path, capsys):
    out = str(uninterrupted[0] / "out")
    texts = generate_script.main(["--model", out, "--device", "cpu", "--quick", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "generations.jsonl").read_text())
    assert record == {"prompt": "Every effort moves you", "text": texts[0]}
    with pytest.raises(SystemExit) as exit_info:
        generate_script.main(["--model", out, "--device", "cpu", "--prompt", ""])
    assert exit_info.value.code == 1 and "the prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "message"),
    [(["--beams", "0"], "--beams must be at least 1"), (["--beams", "-3"], "--beams must be at least 1"),
     (["--temperature", "-1"], "--temperature must be"), (["--temperature", "nan"], "--temperature must be"),
     (["--top-k", "0"], "--top-k must be"), (["--top-p", "0"], "--top-p must be"), (["--top-p", "1.5"], "--top-p must be"),
     (["--device", "banana"], "cannot use that device")],
)  # fmt: skip
def test_generate_refuses_impossible_sampling_settings_with_a_non_zero_status(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_script.main(["--model", str(tmp_path), *bad])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_reports_a_missing_model_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_script.main(["--model", str(tmp_path / "nothing")])
    assert "does not exist" in capsys.readouterr().err
