"""Small helpers every notebook and script uses: quick mode, device, seeding, banner."""

from __future__ import annotations

import os
import platform
import random

import torch

# The one switch for quick mode. It only shrinks sizes (model dims, epochs, data subsets);
# code paths stay the same, so a quick run exercises exactly the code a full run does.
QUICK_ENV_VAR = "LLMS_QUICK"
_TRUTHY = {"1", "true", "yes", "on"}


def is_quick() -> bool:
    """True when ``LLMS_QUICK`` is set to 1/true/yes/on (any case)."""
    return os.environ.get(QUICK_ENV_VAR, "").strip().lower() in _TRUTHY


def by_mode(full, quick):
    """Return ``quick`` in quick mode and ``full`` otherwise.

    Use it for sizes only: ``num_epochs = by_mode(full=10, quick=1)``.
    """
    return quick if is_quick() else full


def get_device(prefer: str | None = None) -> torch.device:
    """Pick the best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (or the ``LLMS_DEVICE`` environment variable) forces one, e.g. ``"cpu"``,
    which helps when comparing results across machines.
    """
    choice = prefer or os.environ.get("LLMS_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed: int = 123) -> None:
    """Seed Python, NumPy (when installed) and PyTorch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with pandas and matplotlib
        return
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
