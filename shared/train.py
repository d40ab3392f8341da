"""The training loop, built in ch05 and reused by ch06, ch07, appendix D and ``ch05/pretrain.py``.

One loop serves every chapter: what changes between pretraining, classification and
instruction finetuning is only how a batch turns into a loss, so the loss is a setting.

- :func:`calc_loss_batch`: next-token cross-entropy of one batch (the ch05 loss);
- :func:`calc_loss_loader` and :func:`evaluate_model`: average losses for monitoring;
- :class:`TrainSettings` and :func:`train_step`: one optimizer step (forward, loss, backward,
  gradient accumulation, clipping, learning-rate schedule, step), the same in every loop;
- :func:`evaluate_and_record`: evaluate and append the result to the history;
- :func:`train_model`: the epoch loop, with the book's argument order, a progress bar,
  per-epoch metrics and exact resumption at epoch boundaries (:mod:`shared.checkpoint`);
- :class:`LossWatch`: stops a run at its first NaN or infinite loss (:class:`NonFiniteLossError`);
- :func:`make_optimizer`: AdamW with weight decay on matrices only, fused where possible;
- :func:`lr_at` and :class:`WarmupCosine`: linear warm-up then cosine decay (appendix D);
- :func:`autocast`: bfloat16 mixed precision for the forward passes, or nothing (float32);
- :func:`save_training_run`: a finished run's model (Hugging Face format), loss log and plot.

A loss function has the signature of :func:`calc_loss_batch`:
``loss_fn(input_batch, target_batch, model, device) -> scalar tensor``. ``device=None``
everywhere in this module means "where the model is"; no function here moves the model.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bar: works in terminals and notebooks without ipywidgets

from shared.checkpoint import TrainHistory, save_checkpoint
from shared.generate import generate
from shared.utils import eval_mode, is_disk_full
from shared.weights import save_hf_gpt2

LossFn = Callable[[object, object, nn.Module, torch.device], torch.Tensor]


class EmptyLoaderError(ValueError):
    """A data loader gave no batch at all, so there is no loss to report."""


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite: every step after it would only spread the NaN."""


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are: what ``device=None`` means in this module."""
    return next(model.parameters()).device


def check_device(model: nn.Module, device) -> torch.device:
    """``device`` as a torch.device (None: where the model is), refusing one the model is not on.

    The loop moves batches, never the model, so the two must agree; a model on the ``meta``
    device has no weights to train.
    """
    try:
        device = model_device(model) if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda', 'cuda:1' or 'mps'.") from None
    where = model_device(model)
    if where.type == "meta":
        raise ValueError("the model is on the meta device (shapes, no weights); build or load it on a real device.")
    same_index = device.index is None or where.index is None or device.index == where.index
    if device.type != where.type or not same_index:
        raise ValueError(
            f"the model is on {where} but device={str(device)!r}; move it first (model.to({str(device)!r})) "
            f"or pass device={str(where)!r} (None means where the model is)."
        )
    return device


def calc_loss_batch(input_batch, target_batch, model: nn.Module, device=None) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch.

    ``input_batch`` and ``target_batch`` are (batch, tokens) ids; targets are the inputs
    shifted by one. Positions whose target is -100 (padding in ch07) do not count. The batch is
    moved to ``device`` (None: where the model is); the model is never moved.
    """
    device = model_device(model) if device is None else device
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    logits = model(input_batch)
    # cross_entropy wants (N, classes) and (N,): flatten batch and token dimensions together.
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def _empty_loader_message(loader) -> str:
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else "unknown"
    batch_size = getattr(loader, "batch_size", None)
    drop_last = getattr(loader, "drop_last", None)
    return (
        f"the data loader gave no batch (dataset size {size}, batch_size {batch_size}, "
        f"drop_last={drop_last}). Likely causes: the text is shorter than the context length plus one "
        "token, so no window fits; drop_last=True with fewer samples than batch_size; or an empty "
        "split (check the train/validation ratio). Use a longer text, a smaller context length or "
        "batch size, or drop_last=False for validation."
    )


def calc_loss_loader(
    loader: Iterable,
    model: nn.Module,
    device=None,
    num_batches: int | None = None,
    loss_fn: LossFn = calc_loss_batch,
) -> float:
    """Mean loss over the first ``num_batches`` batches of ``loader`` (all of them when None).

    ``device=None``: where the model is.

    Raises :class:`EmptyLoaderError` when the loader yields nothing, instead of returning nan.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1 or None, got {num_batches}.")
    device = model_device(model) if device is None else device
    total, count = None, 0
    for input_batch, target_batch in islice(loader, num_batches):
        loss = loss_fn(input_batch, target_batch, model, device).detach()
        total = loss if total is None else total + loss  # stays on the device: one sync at the end
        count += 1
    if count == 0:
        raise EmptyLoaderError(_empty_loader_message(loader))
    return (total / count).item()


def evaluate_model(
    model: nn.Module, train_loader, val_loader, device=None, eval_iter: int = 5, loss_fn: LossFn = calc_loss_batch
) -> tuple[float, float]:
    """Training and validation loss over ``eval_iter`` batches each, with dropout off.

    Runs under ``torch.inference_mode``, which skips autograd's bookkeeping (version counters,
    view tracking) that ``no_grad`` still does: the same numbers, a little faster.
    """
    with eval_mode(model), torch.inference_mode():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, loss_fn=loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, loss_fn=loss_fn)
    return train_loss, val_loss


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------


def autocast(device, dtype: torch.dtype | str | None = None) -> contextlib.AbstractContextManager:
    """A context for forward passes: bfloat16 autocast when ``dtype`` is bfloat16, else a no-op.

    Under autocast the matrix products run in bfloat16 while the weights, their gradients and the
    optimizer state stay float32, and PyTorch keeps precision-sensitive ops (softmax, the loss) in
    float32. bfloat16 has float32's exponent range, so no loss scaling is needed; float16 would
    need a ``GradScaler`` and is refused. On GPUs since Ampere and on CPUs with AVX512-BF16 or AMX
    the matrix products run several times faster (``benchmarks/train.py`` measures it); losses
    agree with float32 to about two decimals, not bit for bit.
    """
    if dtype is None or dtype in (torch.float32, "float32"):
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, "bfloat16"):
        raise ValueError(
            f"autocast dtype must be None (float32) or bfloat16, got {dtype!r}; float16 needs "
            "loss scaling (torch.amp.GradScaler), which this loop does not do."
        )
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# --------------------------------------------------------------------------------------------


def _fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=params[0].device, dtype=params[0].dtype)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only, fused into one kernel where supported.

    Weight decay pulls weights towards zero. That regularises the matrices that mix features
    (linear layers), but biases and norm scales only shift and rescale, and shrinking a norm's
    scale towards zero would fight the normalisation itself. Embeddings are looked up row by
    row, so decay would mostly shrink the rows of rare tokens that seldom get a gradient. GPT-2
    style training (nanoGPT, the GPT-3 paper's set-up) therefore decays the matrices only.
    """
    _check_rate("lr", lr)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0 (0 turns it off), got {weight_decay}.")
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied matrix once
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False).")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    # The fused kernel updates all parameters in one pass over memory instead of several;
    # it is exact (the same AdamW update) and supported on CUDA, and on CPU in recent torch.
    fused = _fused_adamw_supported(decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _check_rate(name: str, value: float, *, zero_ok: bool = False) -> None:
    """A learning rate must be a finite number above 0 (or at least 0 where ``zero_ok``)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        least = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {least}, got {value!r}.")


def lr_at(
    step: int,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    initial_lr: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """The learning rate at optimizer step ``step`` (counted from 0).

    Linear warm-up from ``initial_lr`` at step 0 to ``peak_lr`` at step ``warmup_steps``, then
    half a cosine from ``peak_lr`` down to ``min_lr`` at step ``total_steps``; ``min_lr``
    after that. The rates must be finite, ``peak_lr > 0`` and ``0 <= initial_lr, min_lr <= peak_lr``
    (a "decay" that ends above its peak would be a rise).
    """
    _check_rate("peak_lr", peak_lr)
    _check_rate("initial_lr", initial_lr, zero_ok=True)
    _check_rate("min_lr", min_lr, zero_ok=True)
    if min_lr > peak_lr or initial_lr > peak_lr:
        raise ValueError(
            f"need initial_lr <= peak_lr and min_lr <= peak_lr, got initial_lr={initial_lr}, "
            f"min_lr={min_lr}, peak_lr={peak_lr}."
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}."
        )
    if step < warmup_steps:
        return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr if total_steps > warmup_steps else peak_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Applies :func:`lr_at` to an optimizer: call ``apply(step)`` before each ``optimizer.step()``.

    Its only state is the last step it was applied at (the hyper-parameters come from the
    constructor), so a checkpoint that stores the step resumes the schedule exactly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int,
        initial_lr: float = 0.0,
        min_lr: float = 0.0,
    ):
        self.optimizer = optimizer
        self.settings = dict(
            peak_lr=peak_lr,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            initial_lr=initial_lr,
            min_lr=min_lr,
        )
        lr_at(0, **self.settings)  # validate the settings now, not at the first step
        self.step = 0

    def lr(self, step: int) -> float:
        return lr_at(step, **self.settings)

    def apply(self, step: int) -> float:
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.step = step
        return lr

    def state_dict(self) -> dict:
        return {"step": self.step, **self.settings}

    def load_state_dict(self, state: dict) -> None:
        settings = {key: state[key] for key in self.settings}
        if settings != self.settings:
            raise ValueError(
                f"schedule settings differ: checkpoint has {settings}, this run {self.settings}."
            )
        self.apply(state["step"])


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`train_step` turns micro-batches into an optimizer step, and what runs after each epoch.

    - ``loss_fn(input_batch, target_batch, model, device)``: a batch's scalar loss; the default is
      next-token cross-entropy (:func:`calc_loss_batch`). ch06 passes a classification loss.
    - ``grad_accum_steps``: sum the gradients of this many batches per optimizer step (each
      batch's loss is divided by it, so the step sees their mean).
    - ``grad_clip``: rescale the gradients so their global norm is at most this, on every
      optimizer step ``>= clip_from_step`` (appendix D clips from the end of warm-up); the norm
      before clipping is measured on every step.
    - ``lr_schedule.apply(step)`` sets the learning rate before each optimizer step.
    - ``autocast_dtype=torch.bfloat16``: forward passes under bfloat16 autocast (see
      :func:`autocast`); None trains in float32.
    - ``epoch_end(epoch, model)``: run by :func:`train_model` after each epoch; the dict it
      returns is stored in ``history.epoch_metrics`` (ch06 reports accuracies this way).
    - ``max_new_tokens``: the length of :func:`train_model`'s greedy sample after each epoch.
    """

    loss_fn: LossFn = calc_loss_batch
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    clip_from_step: int = 0
    lr_schedule: WarmupCosine | None = None
    autocast_dtype: torch.dtype | str | None = None
    epoch_end: Callable[[int, nn.Module], dict] | None = None
    max_new_tokens: int = 50

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be at least 1, got {self.grad_accum_steps}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive max norm or None, got {self.grad_clip}.")
        autocast("cpu", self.autocast_dtype)  # refuses a bad dtype before any work is done


def train_step(
    model: nn.Module, optimizer, batches, history: TrainHistory, settings: TrainSettings, device=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step: forward, loss, backward over each micro-batch, then clip, schedule, step.

    ``batches``: the ``(input_batch, target_batch)`` pairs of this step (at most
    ``settings.grad_accum_steps``; an epoch's leftover batches make a shorter step). Records
    the step's learning rate (and whether it clipped) in ``history`` and advances
    ``history.global_step``. Under DistributedDataParallel only the last micro-batch
    all-reduces the gradients. Returns the step's mean loss and the gradient norm before
    clipping (None without ``grad_clip``), both still on the device so that nothing waits.
    """
    device = model_device(model) if device is None else device
    scale = settings.grad_accum_steps
    total = None
    for index, (input_batch, target_batch) in enumerate(batches):
        last = index == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, settings.autocast_dtype):
                loss = settings.loss_fn(input_batch, target_batch, model, device)
            (loss / scale if scale > 1 else loss).backward()
        loss = loss.detach() / scale if scale > 1 else loss.detach()
        total = loss if total is None else total + loss
    step = history.global_step
    if settings.lr_schedule is not None:
        settings.lr_schedule.apply(step)
    history.lrs.append(optimizer.param_groups[0]["lr"])
    norm = None
    if settings.grad_clip is not None:
        clip_now = step >= settings.clip_from_step
        params = [p for p in model.parameters() if p.requires_grad]
        # With an infinite max norm the call only measures the norm (the scale factor is 1).
        norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip if clip_now else float("inf"))
        history.clipped.append(clip_now)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    history.global_step += 1
    return total, None if norm is None else norm.detach()


class LossWatch:
    """Stops training at the first loss that is NaN or infinite, without waiting on every step.

    ``add(step, loss)`` keeps each step's loss on the device; ``check()`` reads them all at once
    (one host sync, done where the loop syncs anyway: evaluations, checkpoints) and raises
    :class:`NonFiniteLossError` naming the first bad step. Call ``check()`` before saving a
    checkpoint, so that the last one on disk holds finite weights.
    """

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.last_finite: tuple[int, float] | None = None

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach()))

    def check(self) -> None:
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        losses = torch.stack([loss.float().reshape(()) for _, loss in self.pending]).cpu()  # () or (1,) each
        self.pending.clear()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad) == 0:
            self.last_finite = (steps[-1], float(losses[-1]))
            return
        first = int(bad[0])
        if first > 0:
            self.last_finite = (steps[first - 1], float(losses[first - 1]))
        last = "none yet" if self.last_finite is None else f"{self.last_finite[1]:.4f} at step {self.last_finite[0]}"
        raise NonFiniteLossError(
            f"the training loss became {float(losses[first])} at optimizer step {steps[first]} (last finite "
            f"loss: {last}); training stopped and the weights since then are not usable. Usual causes: a "
            "learning rate too high (lower it or add warm-up and gradient clipping), float16 without loss "
            "scaling (use bfloat16 or float32), or bad data (a batch with out-of-range token ids or all "
            "targets masked with -100). The last checkpoint saved before it is intact."
        )


def evaluate_and_record(
    model: nn.Module, train_loader, val_loader, history: TrainHistory, eval_iter: int, settings: TrainSettings,
    device=None,
) -> tuple[float, float]:  # fmt: skip
    """:func:`evaluate_model` under the settings' precision, recorded in ``history`` at the last step."""
    device = model_device(model) if device is None else device
    with autocast(device, settings.autocast_dtype):
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, settings.loss_fn)
    history.record_evaluation(history.global_step - 1, train_loss, val_loss)
    return train_loss, val_loss


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _count(batch) -> tuple[int, int]:
    """(tokens, rows) in an input batch: a tensor, or a tuple/list/dict whose first tensor counts."""
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        batch = next((item for item in batch if torch.is_tensor(item)), None)
    if not torch.is_tensor(batch):
        return 0, 0
    return batch.numel(), (batch.shape[0] if batch.ndim else 1)


def _groups(loader, size: int) -> Iterator[list]:
    """The loader's batches in lists of ``size`` (the last list of an epoch may be shorter)."""
    batches = iter(loader)
    while group := list(islice(batches, size)):
        yield group


def _sample(model, tokenizer, start_context: str, device, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(start_context)], device=device)
    with eval_mode(model):
        out = generate(model, ids, max_new_tokens=max_new_tokens)  # crops to the context window itself
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def _check_counts(**counts) -> None:
    """``num_epochs`` a whole number >= 0; ``eval_freq`` and ``eval_iter`` whole numbers >= 1."""
    for name, value in counts.items():
        least = 0 if name == "num_epochs" else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}.")


def train_model(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    device,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str | None = None,
    tokenizer=None,
    *,
    settings: TrainSettings | None = None,
    progress: bool = True,
    history: TrainHistory | dict | None = None,
    checkpoint_path=None,
) -> TrainHistory:
    """Train for ``num_epochs`` epochs; evaluate every ``eval_freq`` optimizer steps.

    - Evaluation (``eval_iter`` batches of each loader, dropout off) happens after optimizer
      steps 0, eval_freq, 2 * eval_freq, ..., as in the book's ``train_model_simple``, so for the
      same weights, data order and loss the recorded losses are the book's.
    - ``device``: where batches go (None: where the model is; the model is never moved).
    - ``settings``: a :class:`TrainSettings` (loss, gradient accumulation, clipping, learning-rate
      schedule, bfloat16 autocast, an ``epoch_end`` hook); the default is the book's loop.
    - A greedy sample from ``start_context`` is printed after each epoch when ``tokenizer`` is given.
    - ``history``: a :class:`TrainHistory` (or its ``state_dict()``) from a checkpoint saved at the
      end of an epoch; training continues where it stopped, with the same data order.
    - ``checkpoint_path``: save a resumable checkpoint there (atomically) after every epoch.

    Returns the :class:`TrainHistory` (it unpacks as ``train_losses, val_losses, tokens_seen``).
    Losses are read from the device only at evaluations and checkpoints, so steps never wait for
    them; a NaN or infinite loss then stops the run (:class:`LossWatch`) before any checkpoint.
    An empty training loader, a ``device`` the model is not on, or ``num_epochs=1.5`` is refused.
    """
    settings = settings if settings is not None else TrainSettings()
    _check_counts(num_epochs=num_epochs, eval_freq=eval_freq, eval_iter=eval_iter)
    history = TrainHistory.from_state_dict(history) if isinstance(history, dict) else history or TrainHistory()
    device = check_device(model, device)
    pending_norms: list[torch.Tensor] = []  # kept on the device until the history needs them
    watch, started = LossWatch(), time.perf_counter()

    def sync_history() -> None:
        """Move the pending gradient norms and the time trained since the last call into ``history``."""
        nonlocal started
        watch.check()
        history.grad_norms.extend(float(n) for n in pending_norms)
        pending_norms.clear()
        history.elapsed, started = history.elapsed + time.perf_counter() - started, time.perf_counter()

    sized = hasattr(train_loader, "__len__")  # the bar's length, when the loader has one
    total = math.ceil(len(train_loader) / settings.grad_accum_steps) * num_epochs if sized else None
    bar = tqdm(total=total, initial=history.global_step, desc="training", unit="step", disable=not progress)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    while history.epoch < num_epochs:
        steps_before = history.global_step
        for batches in _groups(train_loader, settings.grad_accum_steps):
            for input_batch, _ in batches:
                tokens, rows = _count(input_batch)
                history.total_tokens += tokens
                history.total_examples += rows
            loss, norm = train_step(model, optimizer, batches, history, settings, device)
            watch.add(history.global_step - 1, loss)
            if norm is not None:
                pending_norms.append(norm)
            bar.update(1)
            if (history.global_step - 1) % eval_freq == 0:
                train_loss, val_loss = evaluate_and_record(
                    model, train_loader, val_loader, history, eval_iter, settings, device
                )
                sync_history()
                bar.set_postfix(epoch=history.epoch + 1, train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if history.global_step == steps_before:
            raise EmptyLoaderError("training: " + _empty_loader_message(train_loader))
        history.epoch += 1
        if settings.epoch_end is not None:
            history.epoch_metrics.append(dict(settings.epoch_end(history.epoch, model)))
            model.train()
        if tokenizer is not None and start_context is not None:
            with autocast(device, settings.autocast_dtype):
                sample = _sample(model, tokenizer, start_context, device, settings.max_new_tokens)
            bar.write(f"epoch {history.epoch}: {sample}")
        if checkpoint_path is not None:
            sync_history()
            save_checkpoint(checkpoint_path, model, optimizer, history=history, lr_schedule=settings.lr_schedule)
    bar.close()
    sync_history()
    return history


# --------------------------------------------------------------------------------------------
# The outputs of a run
# --------------------------------------------------------------------------------------------


def _write_loss_log(history: TrainHistory, path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "tokens_seen", "lr", "train_loss", "val_loss"])
        rows = zip(history.eval_steps, history.tokens_seen, history.train_losses, history.val_losses, strict=True)
        for step, tokens, train, val in rows:
            lr = f"{history.lrs[step - 1]:.6g}" if step else 0  # the rate of the step that led here
            writer.writerow([step, tokens, lr, f"{train:.6f}", f"{val:.6f}"])


def _plot_losses(history: TrainHistory, path: Path) -> None:
    import matplotlib  # imported here: only runs that save outputs need it

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.eval_steps, history.train_losses, marker="o", label="training")
    ax.plot(history.eval_steps, history.val_losses, marker="o", linestyle="--", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_training_run(out_dir, model: nn.Module, history: TrainHistory, summary: dict | None = None) -> Path:
    """Write a finished run to ``out_dir``; each file appears whole or not at all.

    ``config.json`` + ``model.safetensors`` (Hugging Face's GPT-2 format), ``loss_log.csv`` (one
    row per evaluation), ``loss.png`` and, when given, ``summary.json``. Files are written into
    a staging folder inside ``out_dir`` and renamed into place; a staging folder left by a run
    killed while writing is removed by the next call. A full disk raises an OSError (ENOSPC)
    naming ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".run-out.*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".run-out.", dir=out_dir))
    try:
        save_hf_gpt2(model, staging)
        _write_loss_log(history, staging / "loss_log.csv")
        _plot_losses(history, staging / "loss.png")
        if summary is not None:
            (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for file in staging.iterdir():
            os.replace(file, out_dir / file.name)
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise OSError(
            errno.ENOSPC, f"the disk holding {out_dir} is full: the run's model, loss log and plot were not "
            "all written; free some space or pass an output folder on another disk (--out-dir)."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
