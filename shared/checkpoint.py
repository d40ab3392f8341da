"""Resumable training checkpoints, built in ch05.

A checkpoint holds everything needed to continue a run as if it had never stopped: the model
config and weights, the optimizer's moment estimates, the learning-rate schedule, the training
history (:class:`TrainHistory`: step, epoch, losses) and every random number generator's
state. With those, resuming gives bitwise the same weights on a CPU as an uninterrupted run
(``train_model`` saves at epoch ends; ``ch05/pretrain.py`` after any step).

Files are written to a temporary name in the same folder and renamed into place, so a crash or
a full disk mid-save never destroys the previous checkpoint. Loading uses
``torch.load(..., weights_only=True)``, which refuses arbitrary pickled code. For a run that
saves every N steps, :func:`save_step_checkpoint` keeps a rotating set of ``step_<N>.pt`` files
and :func:`newest_checkpoint` picks the newest readable one.
"""

from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.distributed import unwrap
from shared.utils import CheckpointError, atomic_path, check_writable

FORMAT = "llms-checkpoint/1"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class TrainHistory:
    """What a training run records, and where it stands (for resuming).

    Written by :func:`shared.train.train_model` and ``ch05/pretrain.py``, stored in every
    checkpoint. Unpacks like the book's ``train_model_simple`` result:
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
    total_tokens: int = 0
    total_examples: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumed runs

    def __iter__(self):
        return iter((self.train_losses, self.val_losses, self.tokens_seen))

    def record_evaluation(self, step: int, train_loss: float, val_loss: float) -> None:
        """Append one evaluation: its losses, its step and how much had been trained on by then."""
        self.train_losses.append(train_loss)
        self.val_losses.append(val_loss)
        self.tokens_seen.append(self.total_tokens)
        self.examples_seen.append(self.total_examples)
        self.eval_steps.append(step)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> TrainHistory:
        known = {f.name for f in fields(cls)}  # older checkpoints may hold fields since dropped
        return cls(**{key: value for key, value in state.items() if key in known})


def rng_states() -> dict:
    """The state of Python's, NumPy's and torch's random generators, in plain types and tensors."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(value):
    """A checkpoint stores plain data: dataclasses and schedules become their state dicts."""
    if value is None:
        return None
    return value.state_dict() if hasattr(value, "state_dict") else value


def save_checkpoint(
    path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    history=None,
    lr_schedule=None,
    extra: dict | None = None,
) -> Path:
    """Write a resumable checkpoint to ``path`` atomically; return the path.

    ``history`` is a :class:`TrainHistory` (or any object with ``state_dict()``),
    ``lr_schedule`` a :class:`shared.train.WarmupCosine`, ``extra`` any plain data (strings,
    numbers, lists, dicts, tensors) such as a corpus fingerprint. A full disk, a read-only folder
    or a file where the folder should be raises an OSError naming the place; the previous file at
    ``path``, if any, is kept.
    """
    path = Path(path)  # atomic_path creates its folder, naming a file in the way or a read-only parent
    model = unwrap(model)
    checkpoint = {
        "format": FORMAT,
        "config": dict(model.cfg) if hasattr(model, "cfg") else None,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_schedule": _plain(lr_schedule),
        "history": _plain(history),
        "rng": rng_states(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
        os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint
    return path


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint file's contents without applying them; raise CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch's unpickler raises many kinds (IndexError, KeyError, ...) on junk
        raise CheckpointError(
            f"cannot read the checkpoint {path}: it is truncated or corrupt ({type(error).__name__}: {error}). "
            "Delete it and resume from an earlier checkpoint, or start the run again."
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by shared.checkpoint.save_checkpoint.")
    return checkpoint


def check_model_matches(checkpoint: dict, model: nn.Module, path="checkpoint") -> None:
    """Refuse a checkpoint made for a model with a different config."""
    saved, current = checkpoint.get("config"), getattr(unwrap(model), "cfg", None)
    if saved is None or current is None or dict(saved) == dict(current):
        return
    differences = {
        key: (saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    }
    raise CheckpointError(
        f"{path} was saved from a model with a different config; differences (checkpoint, this model): "
        f"{differences}. Build the model with the checkpoint's config (checkpoint['config'])."
    )


def load_checkpoint(
    path,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr_schedule=None,
    map_location="cpu",
) -> dict:
    """Load ``path`` into what is given (model, optimizer, schedule, random generators).

    Returns the checkpoint dict; its ``"history"`` is a :class:`TrainHistory` ready to pass to
    ``train_model(..., history=...)``.
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    if model is not None:
        check_model_matches(checkpoint, model, path)
        try:
            unwrap(model).load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise CheckpointError(f"the weights in {path} do not fit the model: {error}") from error
    if optimizer is not None:
        if checkpoint["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state; it cannot resume training exactly.")
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(
                f"the optimizer state in {path} does not fit this optimizer: {error}"
            ) from error
    if lr_schedule is not None and checkpoint["lr_schedule"] is not None:
        lr_schedule.load_state_dict(checkpoint["lr_schedule"])
    set_rng_states(checkpoint["rng"])
    if checkpoint["history"] is not None:
        checkpoint["history"] = TrainHistory.from_state_dict(checkpoint["history"])
    return checkpoint


def resume(path, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr_schedule=None, map_location="cpu"):
    """The :class:`TrainHistory` to continue from, or None when ``path`` does not exist.

    One script can then both start a run and continue it after an interruption::

        history = resume(path, model, optimizer, lr_schedule=schedule)   # None the first time
        train_model(..., history=history, checkpoint_path=path)

    A file that exists is loaded with :func:`load_checkpoint` (model, optimizer, schedule and
    random states), so one that is truncated or belongs to another model raises
    :class:`CheckpointError`: a broken checkpoint is never silently replaced by a fresh start.
    """
    if not Path(path).exists():
        return None
    return load_checkpoint(path, model, optimizer, lr_schedule=lr_schedule, map_location=map_location)["history"]


def step_checkpoints(folder) -> list[Path]:
    """The ``step_<N>.pt`` files in ``folder``, lowest step first ([] when the folder is missing).

    Sorted by the number, not the name, so that ``step_20.pt`` comes before ``step_100.pt``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := STEP_FILE.match(path.name))]
    return [path for _, path in sorted(found)]


# --------------------------------------------------------------------------------------------
# A rotating set of step checkpoints (ch05/pretrain.py)
# --------------------------------------------------------------------------------------------


def prepare_checkpoint_folder(folder) -> Path:
    """Create ``folder`` and check it can be written (before training, not after hours of it).

    Also removes half-written files left by a run killed while saving: they never replaced a
    good checkpoint (see :func:`save_checkpoint`), so nothing is lost.
    """
    folder = check_writable(folder, "checkpoint folder")
    for path in folder.glob(".step_*.part"):  # shared.utils.atomic_path's temporary names
        path.unlink(missing_ok=True)
    return folder


def save_step_checkpoint(folder, keep: int, model, optimizer, *, history, lr_schedule=None, extra=None) -> Path:
    """Write ``step_<N>.pt`` (N: ``history.global_step``) atomically, then delete all but the newest ``keep``."""
    path = Path(folder) / f"step_{history.global_step:08d}.pt"
    save_checkpoint(path, model, optimizer, history=history, lr_schedule=lr_schedule, extra=extra)
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _differences(saved: dict, current: dict) -> str:
    return "; ".join(
        f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    )


def newest_checkpoint(folder, run: dict | None = None) -> Path | None:
    """The newest readable ``step_<N>.pt`` in ``folder``; None when there is none.

    An unreadable file (truncated, corrupt) is skipped with a warning and the previous one is
    tried. ``run``: what the checkpoint's ``extra["run"]`` must equal (the arguments that change
    what a run computes); a readable checkpoint of a different run raises CheckpointError.
    """
    candidates = step_checkpoints(folder)
    for path in reversed(candidates):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as error:
            print(f"warning: {error}\n  -> falling back to the previous checkpoint.", file=sys.stderr, flush=True)
            continue
        saved = checkpoint.get("extra", {}).get("run", {})
        if run is not None and saved != run:
            raise CheckpointError(
                f"{path} belongs to a different run, so it cannot be resumed with these arguments. "
                f"Differences: {_differences(saved, run)}. Use the original arguments, or another "
                "checkpoint folder for a new run."
            )
        return path
    if candidates:
        raise CheckpointError(f"no checkpoint in {folder} is readable; remove them or start afresh.")
    return None
