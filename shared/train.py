"""The training loop, built in ch05 and reused by ch06, ch07 and appendix D.

One loop serves every chapter: what changes between pretraining, classification and
instruction finetuning is only how a batch turns into a loss, so the loss is a parameter.

- :func:`calc_loss_batch`: next-token cross-entropy of one batch (the ch05 loss);
- :func:`calc_loss_loader` and :func:`evaluate_model`: average losses for monitoring;
- :func:`train_model`: the loop, with the book's argument order, plus a pluggable loss, a
  learning-rate schedule and gradient clipping (appendix D), gradient accumulation, a progress
  bar, per-epoch metrics and exact resumption from a checkpoint (:mod:`shared.checkpoint`);
- :func:`make_optimizer`: AdamW with weight decay on matrices only, fused where possible;
- :func:`lr_at` and :class:`WarmupCosine`: linear warm-up then cosine decay (appendix D);
- :func:`autocast`: bfloat16 mixed precision for the forward passes, or nothing (float32).

A loss function has the signature of :func:`calc_loss_batch`:
``loss_fn(input_batch, target_batch, model, device) -> scalar tensor``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bar: works in terminals and notebooks without ipywidgets

from shared.utils import eval_mode

LossFn = Callable[[object, object, nn.Module, torch.device], torch.Tensor]


class EmptyLoaderError(ValueError):
    """A data loader gave no batch at all, so there is no loss to report."""


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def calc_loss_batch(input_batch, target_batch, model: nn.Module, device) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch.

    ``input_batch`` and ``target_batch`` are (batch, tokens) ids; targets are the inputs
    shifted by one. Positions whose target is -100 (padding in ch07) do not count.
    """
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
    device,
    num_batches: int | None = None,
    loss_fn: LossFn = calc_loss_batch,
) -> float:
    """Mean loss over the first ``num_batches`` batches of ``loader`` (all of them when None).

    Raises :class:`EmptyLoaderError` when the loader yields nothing, instead of returning nan.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1 or None, got {num_batches}.")
    total, count = None, 0
    for input_batch, target_batch in islice(loader, num_batches):
        loss = loss_fn(input_batch, target_batch, model, device).detach()
        total = loss if total is None else total + loss  # stays on the device: one sync at the end
        count += 1
    if count == 0:
        raise EmptyLoaderError(_empty_loader_message(loader))
    return (total / count).item()


def evaluate_model(
    model: nn.Module, train_loader, val_loader, device, eval_iter: int, loss_fn: LossFn = calc_loss_batch
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
    after that.
    """
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

    @property
    def warmup_steps(self) -> int:
        return self.settings["warmup_steps"]

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
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainHistory:
    """What :func:`train_model` records, and where it stands (for resuming).

    Unpacks like the book's ``train_model_simple`` result:
    ``train_losses, val_losses, tokens_seen = history``.
    """

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)  # tokens trained on at each evaluation
    examples_seen: list[int] = field(default_factory=list)  # rows trained on at each evaluation
    eval_steps: list[int] = field(default_factory=list)  # optimizer step of each evaluation
    lrs: list[float] = field(default_factory=list)  # learning rate of each optimizer step
    grad_norms: list[float] = field(default_factory=list)  # pre-clip global norm, when clipping
    clipped: list[bool] = field(default_factory=list)  # whether clipping was applied at each step
    epoch_metrics: list[dict] = field(default_factory=list)  # epoch_end's results, one per epoch
    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # micro-batches consumed in the current epoch
    total_tokens: int = 0
    total_examples: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumed runs
    # torch's CPU random state at the start of the current epoch: replaying it gives the
    # epoch's shuffle order again when a run resumes in the middle of an epoch.
    epoch_rng_state: torch.Tensor | None = None
    loader_rng_state: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.train_losses, self.val_losses, self.tokens_seen))

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> TrainHistory:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in state.items() if key in known})


def _count(batch) -> tuple[int, int]:
    """(tokens, rows) in an input batch: a tensor, or a tuple/list/dict whose first tensor counts."""
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        batch = next((item for item in batch if torch.is_tensor(item)), None)
    if not torch.is_tensor(batch):
        return 0, 0
    return batch.numel(), (batch.shape[0] if batch.ndim else 1)


def _sample(model, tokenizer, start_context: str, device, max_new_tokens: int) -> str:
    from shared.generate import generate  # imported here: generate imports the model, not train

    ids = torch.tensor([tokenizer.encode(start_context)], device=device)
    with eval_mode(model):
        out = generate(model, ids, max_new_tokens=max_new_tokens)  # crops to the context window itself
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def _loader_generator(loader) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _start_epoch(train_loader, history: TrainHistory):
    """An iterator over the epoch's batches, replaying the shuffle when resuming mid-epoch."""
    generator = _loader_generator(train_loader)
    if history.batches_done == 0:
        history.epoch_rng_state = torch.get_rng_state()
        history.loader_rng_state = generator.get_state() if generator is not None else None
        return iter(train_loader)
    # Resuming mid-epoch: rewind the random state to the epoch's start, draw the same shuffle,
    # skip the batches already trained on, then return to the state the checkpoint saved.
    now = torch.get_rng_state()
    generator_now = generator.get_state() if generator is not None else None
    torch.set_rng_state(history.epoch_rng_state)
    if generator is not None and history.loader_rng_state is not None:
        generator.set_state(history.loader_rng_state)
    batches = iter(train_loader)
    for _ in range(history.batches_done):
        next(batches)
    torch.set_rng_state(now)
    if generator_now is not None:
        generator.set_state(generator_now)
    return batches


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
    loss_fn: LossFn = calc_loss_batch,
    lr_schedule: WarmupCosine | None = None,
    grad_clip: float | None = None,
    clip_from_step: int = 0,
    grad_accum_steps: int = 1,
    epoch_end: Callable[[int, nn.Module], dict] | None = None,
    max_new_tokens: int = 50,
    progress: bool = True,
    history: TrainHistory | dict | None = None,
    checkpoint_path=None,
    checkpoint_every: int | None = None,
    autocast_dtype: torch.dtype | str | None = None,
) -> TrainHistory:
    """Train for ``num_epochs`` epochs; evaluate every ``eval_freq`` optimizer steps.

    - Evaluation (``eval_iter`` batches of each loader, dropout off) happens after optimizer
      steps 0, eval_freq, 2 * eval_freq, ..., as in the book's ``train_model_simple``, so for the
      same weights, data order and loss the recorded losses are the book's.
    - ``loss_fn(input_batch, target_batch, model, device)`` turns a batch into a scalar loss;
      the default is next-token cross-entropy. ch06 passes a classification loss.
    - ``lr_schedule.apply(step)`` sets the learning rate before each optimizer step.
    - ``grad_clip``: rescale the gradients so their global norm is at most this, on every
      optimizer step ``>= clip_from_step`` (appendix D clips from the end of warm-up).
    - ``grad_accum_steps``: sum the gradients of this many batches per optimizer step (each
      batch's loss is divided by it, so the step sees their mean); an epoch's leftover batches
      still make one step.
    - ``epoch_end(epoch, model)`` runs after each epoch; the dict it returns is stored in
      ``history.epoch_metrics`` (ch06 reports accuracies this way).
    - A greedy sample from ``start_context`` is printed after each epoch when ``tokenizer`` is given.
    - ``history``: a :class:`TrainHistory` (or its ``state_dict()``) from a checkpoint; training
      continues where it stopped, mid-epoch included, with the same data order.
    - ``checkpoint_path`` + ``checkpoint_every``: save a resumable checkpoint (atomically) every
      ``checkpoint_every`` optimizer steps and at the end of every epoch.
    - ``autocast_dtype=torch.bfloat16``: forward passes (training, evaluation, samples) under
      bfloat16 autocast (see :func:`autocast`); the default None trains in float32.

    The loss is read from the device only at evaluations, so steps run without waiting for it.
    Returns the :class:`TrainHistory`, which unpacks as ``train_losses, val_losses, tokens_seen``.
    """
    if num_epochs < 0 or eval_freq < 1 or eval_iter < 1 or grad_accum_steps < 1:
        raise ValueError(
            "need num_epochs >= 0, eval_freq >= 1, eval_iter >= 1 and grad_accum_steps >= 1; got "
            f"{num_epochs}, {eval_freq}, {eval_iter}, {grad_accum_steps}."
        )
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be a positive max norm or None, got {grad_clip}.")
    if checkpoint_every is not None and checkpoint_path is None:
        raise ValueError("checkpoint_every needs a checkpoint_path to write to.")
    if isinstance(history, dict):
        history = TrainHistory.from_state_dict(history)
    history = history if history is not None else TrainHistory()
    device = torch.device(device)
    autocast(device, autocast_dtype)  # refuses a bad dtype before any work is done
    params = [p for p in model.parameters() if p.requires_grad]

    pending_norms: list[torch.Tensor] = []  # kept on the device until the history needs them
    started = time.perf_counter()

    def sync_history() -> None:
        """Move the pending gradient norms and the time trained since the last call into ``history``."""
        nonlocal started
        history.grad_norms.extend(float(n) for n in pending_norms)
        pending_norms.clear()
        now = time.perf_counter()
        history.elapsed += now - started
        started = now

    def save() -> None:
        from shared.checkpoint import save_checkpoint  # checkpoint imports this module

        sync_history()
        save_checkpoint(checkpoint_path, model, optimizer, history=history, lr_schedule=lr_schedule)

    steps_per_epoch = (
        math.ceil(len(train_loader) / grad_accum_steps) if hasattr(train_loader, "__len__") else None
    )
    total = steps_per_epoch * num_epochs if steps_per_epoch is not None else None
    bar = tqdm(total=total, initial=history.global_step, desc="training", unit="step", disable=not progress)
    model.train()
    while history.epoch < num_epochs:
        batches = _start_epoch(train_loader, history)
        micro = 0  # micro-batches accumulated into the current step
        optimizer.zero_grad(set_to_none=True)
        remaining = len(train_loader) - history.batches_done if hasattr(train_loader, "__len__") else None
        for index, (input_batch, target_batch) in enumerate(batches):
            with autocast(device, autocast_dtype):
                loss = loss_fn(input_batch, target_batch, model, device)
            (loss / grad_accum_steps if grad_accum_steps > 1 else loss).backward()
            tokens, rows = _count(input_batch)
            history.total_tokens += tokens
            history.total_examples += rows
            history.batches_done += 1
            micro += 1
            last_of_epoch = remaining is not None and index + 1 == remaining
            if micro < grad_accum_steps and not last_of_epoch:
                continue

            step = history.global_step
            if lr_schedule is not None:
                lr_schedule.apply(step)
            history.lrs.append(optimizer.param_groups[0]["lr"])
            if grad_clip is not None:
                clip_now = step >= clip_from_step
                # With an infinite max norm the call only measures the norm (the scale factor is 1).
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if clip_now else float("inf"))
                pending_norms.append(norm.detach())
                history.clipped.append(clip_now)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            micro = 0
            history.global_step += 1
            bar.update(1)

            if step % eval_freq == 0:
                with autocast(device, autocast_dtype):
                    train_loss, val_loss = evaluate_model(
                        model, train_loader, val_loader, device, eval_iter, loss_fn
                    )
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.tokens_seen.append(history.total_tokens)
                history.examples_seen.append(history.total_examples)
                history.eval_steps.append(step)
                sync_history()
                bar.set_postfix(epoch=history.epoch + 1, train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if checkpoint_every is not None and history.global_step % checkpoint_every == 0:
                save()

        history.epoch += 1
        history.batches_done = 0
        if epoch_end is not None:
            history.epoch_metrics.append(dict(epoch_end(history.epoch, model)))
            model.train()
        if tokenizer is not None and start_context is not None:
            with autocast(device, autocast_dtype):
                sample = _sample(model, tokenizer, start_context, device, max_new_tokens)
            bar.write(f"epoch {history.epoch}: {sample}")
        if checkpoint_path is not None:
            save()
    bar.close()
    sync_history()
    return history
