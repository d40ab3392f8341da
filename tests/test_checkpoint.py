"""shared.checkpoint: exact resumption, atomic saves and clear errors."""

import pytest
import torch
from tiny_gpt import TINY_TRAINING
from torch.utils.data import DataLoader, TensorDataset

from shared.checkpoint import (
    CheckpointError,
    TrainHistory,
    load_checkpoint,
    newest_checkpoint,
    prepare_checkpoint_folder,
    resume,
    save_checkpoint,
    save_step_checkpoint,
    step_checkpoints,
)
from shared.model import GPTModel
from shared.train import TrainSettings, WarmupCosine, make_optimizer, train_model

# Dropout on (resuming must also restore the random state), and qkv biases for one more tensor kind.
TINY = {**TINY_TRAINING, "qkv_bias": True}
EPOCHS, BATCHES = 3, 5  # 15 optimizer steps


def _loader():
    ids = torch.randint(0, 64, (2 * BATCHES, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=2, shuffle=True)


def _setup():
    torch.manual_seed(11)
    model = GPTModel(TINY)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    schedule = WarmupCosine(
        optimizer, peak_lr=1e-3, total_steps=EPOCHS * BATCHES, warmup_steps=4, initial_lr=1e-5, min_lr=1e-4
    )
    return model, optimizer, schedule


def _train(model, optimizer, schedule, loader, num_epochs, **kwargs):
    return train_model(
        model,
        loader,
        loader,
        optimizer,
        "cpu",
        num_epochs=num_epochs,
        eval_freq=2,
        eval_iter=1,
        settings=TrainSettings(lr_schedule=schedule, grad_clip=1.0),
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted():
    model, optimizer, schedule = _setup()
    loader = _loader()
    torch.manual_seed(99)
    history = _train(model, optimizer, schedule, loader, EPOCHS)
    return model, history


@pytest.mark.parametrize("stop_after_epochs", [1, 2])
def test_resume_gives_bitwise_the_same_weights_and_losses(tmp_path, uninterrupted, stop_after_epochs):
    reference_model, reference = uninterrupted
    path = tmp_path / "ckpt.pt"

    # The first run stops after `stop_after_epochs` epochs; train_model saved a checkpoint after each.
    model, optimizer, schedule = _setup()
    torch.manual_seed(99)
    _train(model, optimizer, schedule, _loader(), stop_after_epochs, checkpoint_path=path)

    # A fresh process would build everything again, then resume.
    model, optimizer, schedule = _setup()
    torch.manual_seed(12345)  # whatever the state now, the checkpoint's is restored
    history = load_checkpoint(path, model, optimizer, lr_schedule=schedule)["history"]
    assert history.global_step == stop_after_epochs * BATCHES
    resumed = _train(model, optimizer, schedule, _loader(), EPOCHS, history=history)

    assert resumed.train_losses == reference.train_losses
    assert resumed.val_losses == reference.val_losses
    assert resumed.lrs == reference.lrs and resumed.grad_norms == reference.grad_norms
    for a, b in zip(model.state_dict().values(), reference_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_mid_schedule_resumes_at_the_right_learning_rate(tmp_path):
    model, optimizer, schedule = _setup()
    _train(model, optimizer, schedule, _loader(), 1)
    save_checkpoint(tmp_path / "c.pt", model, optimizer, lr_schedule=schedule)
    model2, optimizer2, schedule2 = _setup()
    load_checkpoint(tmp_path / "c.pt", model2, optimizer2, lr_schedule=schedule2)
    assert schedule2.step == schedule.step == BATCHES - 1
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(schedule.lr(BATCHES - 1))


def test_truncated_checkpoint_raises_a_clear_error(tmp_path):
    model, optimizer, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path, model)


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer)
    before = path.read_bytes()

    def broken_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, optimizer)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_checkpoint_of_a_different_config_is_refused(tmp_path):
    model, optimizer, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer)
    other = GPTModel({**TINY, "n_layers": 3})
    with pytest.raises(CheckpointError, match="n_layers"):
        load_checkpoint(path, other)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"some": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_starts_fresh_without_a_file_and_continues_exactly_with_one(tmp_path, uninterrupted):
    reference_model, reference = uninterrupted
    path = tmp_path / "run.pt"

    def one_script_run(num_epochs):
        model, optimizer, schedule = _setup()  # what a script builds before it knows whether to resume
        history = resume(path, model, optimizer, lr_schedule=schedule)
        if history is None:
            torch.manual_seed(99)  # a fresh run seeds itself; a resumed one gets the saved states
        resumed_at = None if history is None else history.epoch  # train_model advances it in place
        return resumed_at, model, _train(
            model, optimizer, schedule, _loader(), num_epochs, history=history, checkpoint_path=path
        )

    first_resumed_at, _, _ = one_script_run(1)  # the first call: nothing to resume from
    assert first_resumed_at is None
    resumed_at, model, finished = one_script_run(EPOCHS)  # the same script, run again
    assert resumed_at == 1
    assert finished.train_losses == reference.train_losses and finished.lrs == reference.lrs
    for a, b in zip(model.state_dict().values(), reference_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_a_broken_checkpoint_instead_of_starting_over(tmp_path):
    model, optimizer, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        resume(path, model, optimizer)


def test_step_checkpoints_sorts_by_step_number_and_ignores_other_files(tmp_path):
    for name in ("step_100.pt", "step_20.pt", "step_00000003.pt", "notes.txt", "step_x.pt", ".step_5.pt.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_00000003.pt", "step_20.pt", "step_100.pt"]
    assert step_checkpoints(tmp_path / "missing") == []


def _step_checkpoint(folder, step, run):
    model, optimizer, _ = _setup()
    return save_step_checkpoint(folder, 2, model, optimizer, history=TrainHistory(global_step=step), extra={"run": run})


def test_step_checkpoints_rotate_and_the_newest_readable_one_is_chosen(tmp_path, capsys):
    run = {"lr": 1e-3}
    for step in (10, 20, 30):
        _step_checkpoint(tmp_path, step, run)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_00000020.pt", "step_00000030.pt"]
    assert newest_checkpoint(tmp_path, run).name == "step_00000030.pt"
    newest = tmp_path / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    assert newest_checkpoint(tmp_path, run).name == "step_00000020.pt"
    assert "falling back to the previous checkpoint" in capsys.readouterr().err
    assert newest_checkpoint(tmp_path / "empty") is None


def test_a_checkpoint_of_another_run_is_refused_with_the_differences(tmp_path):
    _step_checkpoint(tmp_path, 10, {"lr": 1e-3})
    with pytest.raises(CheckpointError, match="belongs to a different run.*lr: checkpoint 0.001, now 0.002"):
        newest_checkpoint(tmp_path, {"lr": 2e-3})


def test_prepare_checkpoint_folder_removes_half_written_files_and_refuses_a_file(tmp_path):
    (tmp_path / ".step_00000040.pt.abc123.part").write_bytes(b"half a checkpoint")
    prepare_checkpoint_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OSError, match="cannot write to the checkpoint folder"):
        prepare_checkpoint_folder(tmp_path / "a-file" / "ckpt")


# --- faults: a clear error naming the file, and the previous checkpoint kept ---


@pytest.mark.parametrize("first", range(256))
def test_any_junk_file_is_a_checkpoint_error_never_a_raw_unpickler_error(tmp_path, first):
    path = tmp_path / "step_00000001.pt"
    path.write_bytes(bytes([first]) + bytes(range(7, 250, 3)) + b"\x00junk\xff" * 8)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("junk", [b".", b"U\x00\x00", b"h\x01junk", b"\x80\x02}q\x00.", b"PK\x03\x04junk"])
def test_newest_checkpoint_skips_junk_whatever_its_first_bytes(tmp_path, capsys, junk):
    model, optimizer, _ = _setup()
    history = TrainHistory(global_step=1)
    good = save_step_checkpoint(tmp_path, 3, model, optimizer, history=history)
    (tmp_path / "step_00000002.pt").write_bytes(junk)
    assert newest_checkpoint(tmp_path) == good
    assert "falling back to the previous checkpoint" in capsys.readouterr().err


def test_a_checkpoint_on_a_full_disk_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model, optimizer, _ = _setup()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optimizer)
    before = path.read_bytes()

    def short_write(obj, file):  # what torch.save raises when the disk fills up mid-file
        file.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match=f"the disk holding {tmp_path} is full: ckpt.pt was not written"):
        save_checkpoint(path, model, optimizer)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_checkpoint_under_a_file_or_in_a_read_only_folder_names_the_problem(tmp_path, monkeypatch):
    from writes import deny_writes_under

    model, _, _ = _setup()
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'taken'} is a file, not a folder"):
        save_checkpoint(tmp_path / "taken" / "ckpt.pt", model)
    deny_writes_under(monkeypatch, tmp_path / "locked")
    with pytest.raises(PermissionError, match="no permission to create the folder"):
        save_checkpoint(tmp_path / "locked" / "ckpt.pt", model)
