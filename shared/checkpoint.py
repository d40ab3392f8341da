"""Resumable training checkpoints, built in ch05.

A checkpoint holds everything needed to continue a run as if it had never stopped: the model
config and weights, the optimizer's moment estimates, the learning-rate schedule, the training
history (step, epoch, position inside the epoch, losses) and every random number generator's
state. With those, resuming gives bitwise the same weights on a CPU as an uninterrupted run.

Files are written to a temporary name in the same folder and renamed into place, so a crash or
a full disk mid-save never destroys the previous checkpoint. Loading uses
``torch.load(..., weights_only=True)``, which refuses arbitrary pickled code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from shared.distributed import unwrap
from shared.utils import atomic_path
from shared.weights import CheckpointError

FORMAT = "llms-checkpoint/1"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def rng_states() -> dict:
    """The state of Python's, NumPy's and torch's random generators, in plain types and tensors."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:  # pragma: no cover - numpy comes with pandas and matplotlib
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

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

    ``history`` is a :class:`shared.train.TrainHistory` (or any object with ``state_dict()``),
    ``lr_schedule`` a :class:`shared.train.WarmupCosine`, ``extra`` any plain data (strings,
    numbers, lists, dicts, tensors) such as a corpus fingerprint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"cannot read the checkpoint {path}: it is truncated or corrupt ({error}). "
            "Delete it and resume from an earlier checkpoint, or start the run again."
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by shared.checkpoint.save_checkpoint.")
    return checkpoint


def check_config(checkpoint: dict, model: nn.Module, path="checkpoint") -> None:
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
    restore_rng: bool = True,
    map_location="cpu",
) -> dict:
    """Load ``path`` into what is given (model, optimizer, schedule, random generators).

    Returns the checkpoint dict; its ``"history"`` is a :class:`shared.train.TrainHistory`
    ready to pass to ``train_model(..., history=...)``.
    """
    from shared.train import TrainHistory  # train imports this module lazily; no cycle at import

    checkpoint = read_checkpoint(path, map_location=map_location)
    if model is not None:
        check_config(checkpoint, model, path)
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
    if restore_rng:
        set_rng_states(checkpoint["rng"])
    if checkpoint["history"] is not None:
        checkpoint["history"] = TrainHistory.from_state_dict(checkpoint["history"])
    return checkpoint


def resume(path, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr_schedule=None, map_location="cpu"):
    """The :class:`~shared.train.TrainHistory` to continue from, or None when ``path`` does not exist.

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
