"""shared.train: losses, the training loop, the optimizer and the learning-rate schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_gpt import TINY_TRAINING as TINY
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.checkpoint import load_checkpoint
from shared.data import load_the_verdict
from shared.dataloader import train_val_loaders
from shared.model import GPTModel
from shared.train import (
    EmptyLoaderError,
    NonFiniteLossError,
    TrainSettings,
    WarmupCosine,
    autocast,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    lr_at,
    make_optimizer,
    save_training_run,
    train_model,
)


def _random_loader(n=12, batch_size=2, seed=0, shuffle=True):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (n, TINY["context_length"] + 1), generator=generator)
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=batch_size, shuffle=shuffle)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTModel({**TINY, **overrides})


def _fit(model, optimizer, num_epochs, eval_freq, loader=None, **settings):
    """``train_model`` on tiny random data (one loader for training and validation), quietly."""
    loader = loader if loader is not None else _random_loader()
    return train_model(
        model, loader, loader, optimizer, "cpu", num_epochs, eval_freq, eval_iter=1, progress=False,
        settings=TrainSettings(**settings),
    )  # fmt: skip


def test_calc_loss_batch_is_cross_entropy_over_every_position():
    model = _model(drop_rate=0.0).eval()
    inputs, targets = next(iter(_random_loader(shuffle=False)))
    logits = model(inputs)
    by_hand = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).mean()
    assert torch.allclose(calc_loss_batch(inputs, targets, model, "cpu"), by_hand, atol=1e-6)


def test_calc_loss_batch_ignores_targets_of_minus_100():
    model = _model(drop_rate=0.0).eval()
    inputs, targets = next(iter(_random_loader(shuffle=False)))
    masked = targets.clone()
    masked[:, 8:] = -100
    logits = model(inputs)
    expected = F.cross_entropy(logits[:, :8].flatten(0, 1), targets[:, :8].flatten())
    assert torch.allclose(calc_loss_batch(inputs, masked, model, "cpu"), expected, atol=1e-6)


def test_untrained_loss_is_close_to_log_vocabulary_size():
    model = _model(drop_rate=0.0).eval()
    with torch.no_grad():
        loss = calc_loss_loader(_random_loader(), model, "cpu")
    assert abs(loss - math.log(TINY["vocab_size"])) < 0.1


def test_calc_loss_loader_num_batches_averages_the_first_batches():
    model = _model(drop_rate=0.0).eval()
    loader = _random_loader(shuffle=False)
    with torch.no_grad():
        first_two = [calc_loss_batch(x, y, model, "cpu").item() for x, y in list(loader)[:2]]
        assert calc_loss_loader(loader, model, "cpu", num_batches=2) == pytest.approx(sum(first_two) / 2)


def test_empty_loader_raises_a_clear_error_instead_of_nan():
    model = _model()
    empty = DataLoader(
        TensorDataset(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)),
        batch_size=2,
        drop_last=True,
    )
    with pytest.raises(EmptyLoaderError, match="drop_last"):
        calc_loss_loader(empty, model, "cpu")
    with pytest.raises(EmptyLoaderError):
        evaluate_model(model, _random_loader(), empty, "cpu", eval_iter=1)


def test_evaluate_model_restores_training_mode():
    model = _model().train()
    evaluate_model(model, _random_loader(), _random_loader(), "cpu", eval_iter=1)
    assert model.training


@pytest.mark.slow
def test_train_model_lowers_the_loss_on_the_verdict():
    the_verdict = load_the_verdict()
    torch.manual_seed(0)
    cfg = {**TINY, "vocab_size": 50257, "context_length": 32, "drop_rate": 0.0}
    model = GPTModel(cfg)
    train, val = train_val_loaders(the_verdict, context_length=32, batch_size=4)
    optimizer = make_optimizer(model, lr=3e-3, weight_decay=0.1)
    history = train_model(
        model, train, val, optimizer, "cpu", num_epochs=1, eval_freq=10, eval_iter=2, progress=False
    )
    train_losses, val_losses, tokens_seen = history
    assert len(train_losses) == len(val_losses) == len(tokens_seen) >= 3
    assert train_losses[-1] < train_losses[0] - 2.0
    assert tokens_seen == sorted(tokens_seen) and tokens_seen[0] == 4 * 32


def test_train_model_matches_a_hand_written_loop():
    def run(use_shared):
        model = _model(seed=3)
        loader = _random_loader(seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        torch.manual_seed(7)
        if use_shared:
            return _fit(model, optimizer, 2, 2, loader).train_losses, model
        losses, step = [], -1
        for _ in range(2):
            model.train()
            for x, y in loader:
                optimizer.zero_grad()
                calc_loss_batch(x, y, model, "cpu").backward()
                optimizer.step()
                step += 1
                if step % 2 == 0:
                    losses.append(evaluate_model(model, loader, loader, "cpu", 1)[0])
        return losses, model

    ours, ours_model = run(True)
    reference, reference_model = run(False)
    assert ours == reference
    for a, b in zip(ours_model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_equals_one_big_batch():
    def run(batch_size, accum):
        model = _model(seed=5, drop_rate=0.0)
        loader = _random_loader(n=8, batch_size=batch_size, shuffle=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        _fit(model, optimizer, 1, 100, loader, grad_accum_steps=accum)
        return model

    big, small = run(4, 1), run(2, 2)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_epoch_end_metrics_are_recorded_per_epoch():
    model = _model()
    optimizer = make_optimizer(model, 1e-3, 0.1)
    history = _fit(model, optimizer, 2, 3, epoch_end=lambda epoch, m: {"epoch": epoch})
    assert history.epoch_metrics == [{"epoch": 1}, {"epoch": 2}]
    assert history.epoch == 2 and history.global_step == 12


def test_make_optimizer_decays_matrices_only():
    model = _model(tie_weights=True)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith("weight") and "norm" not in names[i] for i in decayed)
    assert id(model.tok_emb.weight) not in decayed and id(model.pos_emb.weight) not in decayed
    assert id(model.trf_blocks[0].att.qkv.weight) in decayed
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len(list(model.parameters()))


def test_make_optimizer_refuses_a_fully_frozen_model():
    model = _model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, 1e-3, 0.1)


# --- the learning-rate schedule (appendix D) ---

SCHEDULE = dict(peak_lr=1e-3, total_steps=100, warmup_steps=10, initial_lr=1e-5, min_lr=1e-4)


def test_lr_at_hand_computed_values():
    assert lr_at(0, **SCHEDULE) == pytest.approx(1e-5)
    assert lr_at(9, **SCHEDULE) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 9 / 10)  # last warm-up step
    assert lr_at(10, **SCHEDULE) == pytest.approx(1e-3)  # first decay step: the peak
    assert lr_at(55, **SCHEDULE) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # the cosine's midpoint
    assert lr_at(100, **SCHEDULE) == pytest.approx(1e-4)
    assert lr_at(500, **SCHEDULE) == pytest.approx(1e-4)


def test_lr_at_is_monotone_in_warmup_and_in_decay():
    lrs = [lr_at(step, **SCHEDULE) for step in range(101)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))


def test_lr_at_edge_cases_do_not_divide_by_zero():
    assert lr_at(0, peak_lr=1.0, total_steps=10, warmup_steps=0) == 1.0
    assert lr_at(5, peak_lr=1.0, total_steps=5, warmup_steps=5, min_lr=0.1) == 1.0
    assert lr_at(4, peak_lr=1.0, total_steps=5, warmup_steps=5) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        lr_at(0, peak_lr=1.0, total_steps=5, warmup_steps=6)


def test_schedule_sets_the_learning_rate_of_every_step():
    model = _model()
    optimizer = make_optimizer(model, lr=123.0, weight_decay=0.1)
    schedule = WarmupCosine(optimizer, **{**SCHEDULE, "total_steps": 12, "warmup_steps": 3})
    history = _fit(model, optimizer, 2, 100, lr_schedule=schedule)
    assert history.lrs == pytest.approx([schedule.lr(step) for step in range(12)])


def test_train_model_clips_from_the_step_it_says():
    def run(**clipping):
        model = _model(seed=2, drop_rate=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # a step proportional to the gradient
        weights = []
        original_step = optimizer.step

        def step_and_record(*args, **kwargs):
            original_step(*args, **kwargs)
            weights.append([p.detach().clone() for p in model.parameters()])

        optimizer.step = step_and_record
        torch.manual_seed(0)
        return _fit(model, optimizer, 1, 2, loader=_random_loader(shuffle=False), **clipping), weights

    clipped, clipped_weights = run(grad_clip=1e-3, clip_from_step=3)
    _, plain_weights = run()
    huge, huge_weights = run(grad_clip=1e9)  # a max norm never reached changes nothing
    assert clipped.clipped == [False, False, False, True, True, True]
    assert len(clipped.grad_norms) == 6 and all(n > 1e-3 for n in clipped.grad_norms)
    for step, (a, b) in enumerate(zip(clipped_weights, plain_weights, strict=True)):
        same = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert same == (step < 3), step  # identical until clipping starts, different from then on
    assert huge.clipped == [True] * 6
    for a, b in zip(huge_weights, plain_weights, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_bfloat16_autocast_trains_close_to_float32_with_float32_weights():
    histories, models = [], []
    for dtype in (None, torch.bfloat16):
        model = _model(drop_rate=0.0)
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        histories.append(
            train_model(model, _random_loader(), _random_loader(seed=1), optimizer, "cpu", 2, 2, 2,
                        progress=False, settings=TrainSettings(autocast_dtype=dtype))  # fmt: skip
        )
        models.append(model)
    float32, bfloat16 = histories
    assert len(float32.train_losses) == len(bfloat16.train_losses) > 2
    pairs = zip(float32.train_losses + float32.val_losses, bfloat16.train_losses + bfloat16.val_losses, strict=True)
    for a, b in pairs:
        assert a == pytest.approx(b, abs=0.05)  # bfloat16 keeps about 3 significant digits
    assert float32.train_losses != bfloat16.train_losses  # it did run in lower precision
    assert all(p.dtype == torch.float32 for p in models[1].parameters())


def test_autocast_runs_matrix_products_in_bfloat16_and_none_is_float32():
    layer = torch.nn.Linear(4, 4)
    with autocast("cpu", torch.bfloat16):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast("cpu", None):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, "fp16", torch.int8])
def test_autocast_refuses_float16_and_other_dtypes(dtype):
    with pytest.raises(ValueError, match="bfloat16"):
        autocast("cpu", dtype)
    with pytest.raises(ValueError, match="bfloat16"):
        _fit(_model(), make_optimizer(_model(), 1e-3, 0.0), 1, 1, autocast_dtype=dtype)


def test_calc_loss_loader_takes_the_public_keyword_names():
    model = _model(drop_rate=0.0).eval()
    loader = _random_loader(shuffle=False)
    with torch.no_grad():
        by_keyword = calc_loss_loader(loader=loader, model=model, device="cpu", num_batches=2)
        assert by_keyword == calc_loss_loader(loader, model, "cpu", 2)


def test_device_none_means_where_the_model_is_and_never_moves_it():
    model = _model(drop_rate=0.0).eval()
    loader = _random_loader(shuffle=False)
    with torch.no_grad():
        x, y = next(iter(loader))
        assert torch.equal(calc_loss_batch(x, y, model), calc_loss_batch(x, y, model, "cpu"))
        assert calc_loss_loader(loader, model, num_batches=2) == calc_loss_loader(loader, model, "cpu", 2)
    history = train_model(model, loader, loader, make_optimizer(model, 1e-3, 0.1), None, 1, 2, 1, progress=False)
    assert history.global_step == 6 and next(model.parameters()).device.type == "cpu"


def test_an_epochs_leftover_batches_make_one_shorter_step():
    model = _model(seed=5, drop_rate=0.0)
    history = _fit(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, 100, grad_accum_steps=4)
    assert history.global_step == 2 * 2  # 6 batches per epoch: a step of 4, then one of 2


@pytest.mark.parametrize("bad", [{"grad_accum_steps": 0}, {"grad_clip": 0.0}, {"grad_clip": -1.0}])
def test_train_settings_refuse_impossible_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainSettings(**bad)


# --- bad input and faults: a clear error, never a silent wrong result ---


class _PoisonedAfter(nn.Module):
    """Wraps a model so that its output turns NaN from the given training forward pass on (a bad batch)."""

    def __init__(self, model, from_call):
        super().__init__()
        self.model, self.from_call, self.calls = model, from_call, 0
        self.cfg = model.cfg

    def forward(self, ids):
        self.calls += self.training  # training forward passes only, not evaluations
        logits = self.model(ids)
        return logits * float("nan") if self.training and self.calls >= self.from_call else logits


def test_a_nan_loss_stops_training_naming_the_step_and_the_last_checkpoint_survives(tmp_path):
    model = _PoisonedAfter(_model(seed=1), from_call=8)  # 6 steps per epoch: epoch 2's second step
    optimizer = make_optimizer(model, 1e-3, 0.1)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteLossError, match=r"nan at optimizer step 7 \(last finite loss: [0-9.]+ at step 6\)"):
        train_model(model, _random_loader(), _random_loader(seed=1), optimizer, "cpu", 3, 100, 1,
                    progress=False, checkpoint_path=path)  # fmt: skip
    saved = load_checkpoint(path)
    assert saved["history"].epoch == 1  # the checkpoint of epoch 1, not one of NaN weights
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_learning_rate_that_blows_up_stops_with_the_usual_causes():
    model = _model(seed=2)
    with pytest.raises(NonFiniteLossError, match="learning rate too high.*float16.*bad data"):
        _fit(model, torch.optim.SGD(model.parameters(), lr=1e30), 3, 1)


def test_train_model_refuses_an_empty_training_loader():
    model = _model()
    empty = DataLoader(TensorDataset(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)))
    with pytest.raises(EmptyLoaderError, match="training: the data loader gave no batch"):
        train_model(model, empty, _random_loader(), make_optimizer(model, 1e-3, 0.1), "cpu", 1, 1, 1, progress=False)


@pytest.mark.parametrize("bad", [{"num_epochs": 1.5}, {"num_epochs": -1}, {"eval_freq": 0}, {"eval_iter": True}])
def test_train_model_refuses_counts_that_are_not_whole_numbers(bad):
    model = _model()
    counts = {"num_epochs": 1, "eval_freq": 1, "eval_iter": 1, **bad}
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a whole number"):
        train_model(model, _random_loader(), _random_loader(), make_optimizer(model, 1e-3, 0.1), "cpu",
                    progress=False, **counts)  # fmt: skip


@pytest.mark.parametrize(
    ("device", "message"),
    [("banana", "is not a device"), ("meta", "on cpu but device='meta'"), ("cuda", "on cpu but device='cuda'")],
)
def test_train_model_refuses_a_device_the_model_is_not_on(device, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        _fit_on(model, device)


def test_train_model_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match="meta device"):
        _fit_on(model, None)


def _fit_on(model, device):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_model(model, _random_loader(), _random_loader(), optimizer, device, 1, 1, 1, progress=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_lr": 1e-2}, "min_lr <= peak_lr"),
        ({"peak_lr": float("nan")}, "peak_lr must be a finite number"),
        ({"peak_lr": -1.0}, "peak_lr must be a finite number > 0"),
        ({"min_lr": -1e-4}, "min_lr must be a finite number >= 0"),
        ({"initial_lr": float("inf")}, "initial_lr must be a finite"),
    ],
)
def test_the_schedule_refuses_rates_that_are_not_a_warmup_then_a_decay(settings, message):
    with pytest.raises(ValueError, match=message):
        lr_at(0, **{**SCHEDULE, **settings})
    with pytest.raises(ValueError, match=message):
        WarmupCosine(torch.optim.SGD(_model().parameters(), lr=0.1), **{**SCHEDULE, **settings})


@pytest.mark.parametrize(
    ("lr", "weight_decay", "message"),
    [(float("nan"), 0.1, "lr must be"), (-1e-3, 0.1, "lr must be"), (1e-3, -0.1, "weight_decay must be"),
     (1e-3, float("nan"), "weight_decay must be")],
)  # fmt: skip
def test_make_optimizer_refuses_impossible_rates(lr, weight_decay, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(_model(), lr, weight_decay)


def _disk_full_in_safetensors(monkeypatch):
    import shared.weights

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")

    monkeypatch.setattr(shared.weights, "save_file", full)


def test_save_training_run_on_a_full_disk_names_the_output_folder_and_leaves_nothing_half_written(
    tmp_path, monkeypatch
):
    import errno

    from shared.checkpoint import TrainHistory

    _disk_full_in_safetensors(monkeypatch)
    with pytest.raises(OSError, match=f"the disk holding {tmp_path / 'out'} is full: the run's model") as caught:
        save_training_run(tmp_path / "out", _model(), TrainHistory())
    assert caught.value.errno == errno.ENOSPC and list((tmp_path / "out").iterdir()) == []
