"""The shared package as a whole: its docstring maps every module to its chapter and main names."""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

import shared

SHARED = Path(shared.__file__).resolve().parent
# One line per module: - ``shared.<module>`` (chapter): name, name, ...
# A module's line may go on over indented lines; "(from shared.utils)" notes say where a name is defined.
MAP_LINE = re.compile(r"^- ``shared\.(\w+)`` \(([\w ]+)\): (.+(?:\n  .+)*)", re.MULTILINE)
MAP = {
    module: re.sub(r"\s*\([^)]*\)", "", " ".join(names.split()))
    for module, _chapter, names in MAP_LINE.findall(shared.__doc__)
}
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


ROOT = SHARED.parent
# Where the course's users meet the package: notebooks, chapter scripts and benchmarks.
USER_FILES = sorted(
    path
    for pattern in ("ch*/**/*.py", "ch*/**/*.ipynb", "appendix_*/**/*.py", "appendix_*/**/*.ipynb", "benchmarks/**/*.py")
    for path in ROOT.glob(pattern)
    if ".ipynb_checkpoints" not in path.parts
)


def _code(path: Path) -> str:
    if path.suffix != ".ipynb":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    # IPython magics and shell escapes are not Python: blank them out before parsing.
    lines = [
        "" if line.lstrip().startswith(("%", "!")) else line
        for cell in cells
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
    ]
    return "\n".join(lines)


def imported_shared_names(source: str) -> set[tuple[str, str]]:
    """(module, name) for every ``from shared.<module> import <name>`` in ``source``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shared."):
            module = node.module.split(".")[1]
            found.update((module, alias.name) for alias in node.names)
    return found


def test_the_import_scan_finds_names():
    source = "from shared.train import train_model, lr_at\nimport os\nfrom shared import utils\n"
    assert imported_shared_names(source) == {("train", "train_model"), ("train", "lr_at")}


@pytest.mark.parametrize("path", USER_FILES, ids=[str(p.relative_to(ROOT)) for p in USER_FILES])
def test_every_name_users_import_is_in_the_package_map(path):
    unlisted = sorted(
        f"shared.{module}.{name}"
        for module, name in imported_shared_names(_code(path))
        if name not in {n.strip() for n in MAP.get(module, "").split(",")}
    )
    assert not unlisted, f"{path.name} imports {unlisted}: list them in the docstring of shared/__init__.py"
