"""Importing a chapter's script (a file, not a package module) so tests can call its functions."""

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script(folder: str, name: str):
    """The module ``<repo>/<folder>/<name>.py``, executed once and returned."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
