"""Small helpers every notebook and script uses: quick mode, device, seeding, banner."""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

# The one switch for quick mode. It only shrinks sizes (model dims, epochs, data subsets);
# code paths stay the same, so a quick run exercises exactly the code a full run does.
QUICK_ENV_VAR = "LLMS_QUICK"
_TRUE_SPELLINGS = ("1", "true", "yes", "on")
_FALSE_SPELLINGS = ("", "0", "false", "no", "off")


class CheckpointError(ValueError):
    """A weights file or training checkpoint cannot be read, or does not fit the model it is loaded into.

    Defined here, below both ``shared.weights`` and ``shared.checkpoint``, so that both raise the
    same class (one ``except`` catches either) and neither has to import the other.
    """


def is_quick() -> bool:
    """True when ``LLMS_QUICK`` is 1/true/yes/on, False when unset or 0/false/no/off (any case).

    Any other value raises ValueError: a typo must not silently start a full-length run.
    """
    value = os.environ.get(QUICK_ENV_VAR, "").strip().lower()
    if value in _TRUE_SPELLINGS:
        return True
    if value in _FALSE_SPELLINGS:
        return False
    raise ValueError(
        f"{QUICK_ENV_VAR}={os.environ[QUICK_ENV_VAR]!r} is neither on nor off; use one of "
        f"{', '.join(_TRUE_SPELLINGS)} for quick mode or one of {', '.join(s for s in _FALSE_SPELLINGS if s)} "
        "(or leave it unset) for full mode."
    )


def by_mode(full, quick):
    """Return ``quick`` in quick mode and ``full`` otherwise.

    Use it for sizes only: ``num_epochs = by_mode(full=10, quick=1)``.
    """
    return quick if is_quick() else full


DEVICE_ENV_VAR = "LLMS_DEVICE"


def available_devices() -> list[str]:
    """The device types this machine can use, best first (``cpu`` is always there)."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def get_device(prefer: str | None = None) -> torch.device:
    """Pick the best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (or the ``LLMS_DEVICE`` environment variable) forces one, e.g. ``"cpu"`` or
    ``"cuda:1"``, which helps when comparing results across machines. A device that is not a
    device name, or that this machine does not have, raises ValueError listing the ones it has.
    """
    choice = prefer or os.environ.get(DEVICE_ENV_VAR)
    available = available_devices()
    if not choice:
        return torch.device(available[0])
    source = f"get_device({choice!r})" if prefer else f"{DEVICE_ENV_VAR}={choice!r}"
    try:
        device = torch.device(choice)
    except RuntimeError:
        device = None
    if device is None or device.type not in available:
        raise ValueError(
            f"{source}: this machine cannot use that device; available: {', '.join(available)}. "
            f"Unset {DEVICE_ENV_VAR} to pick the best one automatically."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{source}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    return device


def set_seed(seed: int = 123) -> None:
    """Seed Python, NumPy and PyTorch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS
    np.random.seed(seed)


def banner() -> None:
    """Print where a notebook's outputs come from: versions, device and mode.

    Every notebook calls this in its first code cell.
    """
    try:
        import tiktoken

        tiktoken_version = tiktoken.__version__
    except ImportError:
        tiktoken_version = "not installed"
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tiktoken": tiktoken_version,
        "device": str(get_device()),
        "mode": f"quick ({QUICK_ENV_VAR}=1)" if is_quick() else "full",
    }
    print(" | ".join(f"{key}: {value}" for key, value in facts.items()))


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if missing and return it; a file in the way, or no
    permission to create it, raises an error that names the path and the fix."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.is_file()), folder)
        raise NotADirectoryError(
            f"cannot use the folder {folder}: {blocker} is a file, not a folder; choose another path "
            "or move that file away."
        ) from None
    except PermissionError:
        raise PermissionError(
            f"no permission to create the folder {folder}; choose a folder you can write to or fix the "
            "permissions of its parent."
        ) from None
    return folder


def run_dir(
    out_dir: str | os.PathLike | None,
    runs_folder: str | os.PathLike,
    name: str | None = None,
    *,
    committed: str | os.PathLike | None = None,
    refresh: bool = False,
    create: bool = True,
) -> Path:
    """The folder a script writes into: the one helper behind every script's ``--out-dir``.

    - ``refresh`` (``--refresh-committed``): ``committed``, the results kept in the repository;
    - else ``out_dir`` (``--out-dir``) when given, reused if it exists;
    - else a new ``<runs_folder>/<name>-<date>-<time>`` folder (``<date>-<time>`` without
      ``name``), so that a run never overwrites an earlier one or the committed results.

    Created unless ``create=False`` (a multi-process script whose rank 0 creates it later). A
    file in the way, or no permission, raises an error that names the path and the fix.
    """
    if refresh:
        if committed is None or out_dir is not None:
            raise ValueError("refreshing the committed results needs a committed folder and no --out-dir.")
        return ensure_folder(committed) if create else Path(committed)
    if out_dir is not None:
        return ensure_folder(out_dir) if create else Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stamp = f"{name}-{stamp}" if name else stamp
    if not create:
        return Path(runs_folder) / stamp
    ensure_folder(runs_folder)
    for attempt in range(100):
        folder = Path(runs_folder) / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # two runs started in the same second
            continue
    raise FileExistsError(f"could not create a new run folder in {runs_folder}; pass --out-dir.")


def temp_path_beside(target: str | os.PathLike) -> Path:
    """Create a new, empty temporary file in ``target``'s folder and return its path.

    Its name starts with a dot and ends in ``.part``. ``tempfile.mkstemp`` would always give mode
    0600; this file gets the mode the user's umask gives any new file, so a data directory
    shared by a group stays readable by the group.
    """
    target = Path(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # another name clashed (vanishingly rare): draw again
            continue
        except PermissionError:
            raise PermissionError(
                f"no permission to write in {target.parent}; choose a folder you can write to or fix its "
                "permissions."
            ) from None


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off inside the block; afterwards the model is back in the mode it was in, error or not."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_disk_full(error: Exception) -> bool:
    """ENOSPC, also as libraries report it in their messages: safetensors (Rust) with the OS's
    text, torch.save's zip writer as a short write ("unexpected pos", "file write failed")."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    message = str(error)
    torch_short_write = isinstance(error, RuntimeError) and ("unexpected pos" in message or "file write failed" in message)
    return "No space left on device" in message or torch_short_write


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Write ``target`` all at once or not at all.

    Yields a temporary path beside ``target``; write the file there. When the block ends without
    an error the temporary file is renamed onto ``target`` (an atomic step on one file system),
    otherwise it is deleted and ``target`` keeps its old content::

        with atomic_path("model.safetensors") as tmp:
            save_file(tensors, tmp)

    A file where a folder should be, a folder without write permission and a full disk raise
    errors that name the place and the fix (the last an OSError with ``errno.ENOSPC``).
    """
    target = Path(target)
    ensure_folder(target.parent)
    tmp = temp_path_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise OSError(
            errno.ENOSPC,
            f"the disk holding {target.parent} is full: {target.name} was not written (an older "
            "version, if any, is kept); free some space or choose a folder on another disk.",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data, indent: int = 2) -> Path:
    """Write ``data`` as UTF-8 JSON to ``path`` through :func:`atomic_path`; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def check_writable(folder: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``folder`` and check that a file can be written in it; return it as a Path.

    Scripts call this before hours of work, not after. Raises OSError naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"cannot write to the {what} {folder}: {error}. Choose a writable folder.") from error
    return folder


def add_output_args(parser: argparse.ArgumentParser, name: str, committed: Path | None = None) -> None:
    """Add ``--out-dir`` (default: a new folder ``runs/<name>-<date>-<time>``) to a script's parser,
    and ``--refresh-committed`` when the script has committed results in ``committed``; the two
    exclude each other. :func:`run_dir` resolves the choice; a script never writes over committed
    results unless asked.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out-dir", type=Path, help=f"where the results go (default: runs/{name}-<date>-<time>)")
    if committed is not None:
        group.add_argument("--refresh-committed", action="store_true", help=f"replace the committed files in {committed}")


def exit_on_error(main: Callable[[], object]) -> None:
    """Run a script's ``main()``: a bad file, folder or value ends it with one ``error:`` line and
    exit status 1, not a traceback (the error's message says what to change)."""
    try:
        main()
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
