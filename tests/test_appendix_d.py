"""Appendix D's claims: our schedule + clipping loop is the book's (fixed) loop, and clips from
the step it says, where the book's original ``>`` clipped one step late.

The book's appendix D code (``llms_from_scratch.appendix_d.train_model``) is the oracle here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_gpt import TINY_TRAINING as TINY
from torch.utils.data import DataLoader, TensorDataset

from shared.model import GPTModel
from shared.train import TrainSettings, WarmupCosine, lr_at, train_model

appendix_d = pytest.importorskip("llms_from_scratch.appendix_d")

PEAK_LR, INITIAL_LR, MIN_LR = 1e-2, 1e-4, 1e-4
NUM_EPOCHS, WARMUP_STEPS = 3, 4


class _TinyTokenizer:
    """Enough of a tokenizer for the book's per-epoch sample (ids stay inside the tiny vocabulary)."""

    def encode(self, text, allowed_special=None):
        return [1, 2, 3]

    def decode(self, ids):
        return " ".join(map(str, ids))


def _loaders():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (12, TINY["context_length"] + 1), generator=generator)
    dataset = TensorDataset(ids[:, :-1], ids[:, 1:])
    train = DataLoader(dataset, batch_size=2, shuffle=True)
    val = DataLoader(dataset, batch_size=2, shuffle=False)
    return train, val


def _fresh():
    torch.manual_seed(123)
    model = GPTModel(TINY)
    # Plain AdamW whose lr is the peak: the book's loop reads its peak from the optimizer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.1)
    return model, optimizer


def _books_run(orig_book_version: bool, capsys):
    model, optimizer = _fresh()
    train, val = _loaders()
    train_losses, val_losses, _, lrs = appendix_d.train_model(
        model, train, val, optimizer, "cpu", n_epochs=NUM_EPOCHS, eval_freq=1, eval_iter=1,
        start_context="x", tokenizer=_TinyTokenizer(), warmup_steps=WARMUP_STEPS,
        initial_lr=INITIAL_LR, min_lr=MIN_LR, orig_book_version=orig_book_version,
    )
    capsys.readouterr()  # the book's loop prints every evaluation and a sample per epoch
    return train_losses, val_losses, lrs


def _our_run(clip_from_step: int):
    model, optimizer = _fresh()
    train, val = _loaders()
    total_steps = len(train) * NUM_EPOCHS
    schedule = WarmupCosine(optimizer, peak_lr=PEAK_LR, total_steps=total_steps, warmup_steps=WARMUP_STEPS,
                            initial_lr=INITIAL_LR, min_lr=MIN_LR)
    return train_model(
        model, train, val, optimizer, "cpu", NUM_EPOCHS, eval_freq=1, eval_iter=1,
        settings=TrainSettings(lr_schedule=schedule, grad_clip=1.0, clip_from_step=clip_from_step), progress=False,
    )


@pytest.mark.slow
def test_train_model_with_schedule_and_clipping_matches_the_books_fixed_loop(capsys):
    book_train, book_val, book_lrs = _books_run(orig_book_version=False, capsys=capsys)
    ours = _our_run(clip_from_step=WARMUP_STEPS)
    # The book adds a precomputed increment per warm-up step, we multiply: the learning rates
    # agree to rounding, so the losses agree to rounding too.
    assert ours.lrs == pytest.approx(book_lrs, rel=1e-12)
    assert ours.train_losses == pytest.approx(book_train, rel=1e-5)
    assert ours.val_losses == pytest.approx(book_val, rel=1e-5)


def test_books_original_greater_than_clips_one_step_late(capsys):
    book_original_train, _, _ = _books_run(orig_book_version=True, capsys=capsys)
    one_step_late = _our_run(clip_from_step=WARMUP_STEPS + 1)
    on_time = _our_run(clip_from_step=WARMUP_STEPS)
    assert one_step_late.clipped.index(True) == WARMUP_STEPS + 1
    assert on_time.clipped.index(True) == WARMUP_STEPS
    # The step in between has a gradient norm above 1.0, so whether it is clipped shows in the losses.
    assert on_time.grad_norms[WARMUP_STEPS] > 1.0
    assert one_step_late.train_losses == pytest.approx(book_original_train, rel=1e-5)
    assert on_time.train_losses[WARMUP_STEPS + 1] != pytest.approx(one_step_late.train_losses[WARMUP_STEPS + 1], rel=1e-5)


def test_first_clipped_step_is_the_first_step_at_the_peak_learning_rate():
    history = _our_run(clip_from_step=WARMUP_STEPS)
    first = history.clipped.index(True)
    assert history.lrs[first] == PEAK_LR
    assert all(lr < PEAK_LR for lr in history.lrs[:first])
    assert history.lrs[first] == lr_at(first, peak_lr=PEAK_LR, total_steps=len(history.lrs),
                                       warmup_steps=WARMUP_STEPS, initial_lr=INITIAL_LR, min_lr=MIN_LR)


def test_global_norm_by_hand_equals_what_clip_grad_norm_returns_and_clipping_keeps_the_direction():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    x, y = next(iter(_loaders()[0]))
    logits = model(x)
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) * 50).backward()
    grads = [p.grad for p in model.parameters()]
    before = torch.cat([g.flatten() for g in grads]).double()
    by_hand = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    after = torch.cat([g.flatten() for g in grads]).double()
    assert by_hand > 1.0
    assert returned.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert after.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert after.abs().max().item() == pytest.approx(before.abs().max().item() / by_hand.item(), rel=1e-5)
    assert torch.nn.functional.cosine_similarity(before, after, dim=0).item() == pytest.approx(1.0)


def test_book_scale_script_writes_both_runs_into_a_run_folder(tmp_path):
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "appendix_D" / "book_scale.py"), "--quick", "--epochs", "1", "--device", "cpu"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    plain, refined = (json.loads(next(tmp_path.glob(f"runs/book-scale-*/book_scale_{n}.json")).read_text())
                      for n in ("plain", "refined"))  # fmt: skip
    assert plain["run"] == "plain" and refined["run"] == "refined"
    assert plain["clipped_steps"] == [] and len(plain["grad_norms"]) == plain["total_steps"]
    assert refined["clipped_steps"] == list(range(refined["warmup_steps"], refined["total_steps"]))


def _book_scale():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "appendix_D" / "book_scale.py"
    spec = importlib.util.spec_from_file_location("book_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("bad", "message"),
    [(["--out-dir", "{file}"], "is a file, not a folder"), (["--threads", "0"], "--threads must be at least 1"),
     (["--device", "banana"], "cannot use that device"), (["--epochs", "0"], "--epochs must be at least 1")],
)  # fmt: skip
def test_book_scale_refuses_bad_outputs_and_settings_before_training(tmp_path, monkeypatch, capsys, bad, message):
    book_scale = _book_scale()
    monkeypatch.setattr(book_scale, "run", lambda *args: pytest.fail("training started"))
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        book_scale.main(["--quick", *(arg.format(file=tmp_path / "a-file") for arg in bad)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
