"""The shared package as a whole: its docstring maps every module to its chapter and main names."""

import importlib
import re
from pathlib import Path

import pytest

import shared

SHARED = Path(shared.__file__).resolve().parent
# One line per module: - ``shared.<module>`` (chapter): name, name, ...
MAP_LINE = re.compile(r"^- ``shared\.(\w+)`` \(([\w ]+)\): (.+)$", re.MULTILINE)
MAP = {module: names for module, _chapter, names in MAP_LINE.findall(shared.__doc__)}
MODULES = sorted(path.stem for path in SHARED.glob("*.py") if path.stem != "__init__")


def test_every_module_in_shared_is_in_the_package_map():
    missing = [module for module in MODULES if module not in MAP]
    assert not missing, f"add a line for {missing} to the docstring of shared/__init__.py"


@pytest.mark.parametrize("module", [m for m in MODULES if m in MAP])
def test_names_in_the_map_exist_in_their_module(module):
    loaded = importlib.import_module(f"shared.{module}")
    names = [name.strip() for name in MAP[module].split(",")]
    absent = [name for name in names if name.isidentifier() and not hasattr(loaded, name)]
    assert not absent, f"shared/__init__.py lists {absent} for shared.{module}, which has no such names"
