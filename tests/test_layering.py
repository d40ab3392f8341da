"""The modules of ``shared`` import each other in chapter order only: no cycles, no imports hidden
inside functions to dodge one, and no module reaching up to a later chapter's module."""

import ast
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent / "shared"

# Lower layers may be imported by higher ones (and by modules of their own layer), never the
# other way round. A new module must be given its layer here.
LAYERS = [
    {"utils", "download", "data", "distributed"},  # used by every chapter
    {"tokenizer", "bpe"},  # ch02
    {"dataloader"},  # ch02
    {"attention"},  # ch03
    {"model"},  # ch04
    {"generate"},  # ch04
    {"weights"},  # ch05
    {"checkpoint"},  # ch05
    {"train"},  # ch05, appendix D
    {"corpus", "classification", "instruction", "judge", "lora"},  # ch05-ch07, appendix E
    {"serving"},  # ch07's server
    {"exercises"},  # checks for every chapter's exercises
]
LAYER_OF = {module: level for level, modules in enumerate(LAYERS) for module in modules}
MODULES = sorted(p.stem for p in SHARED.glob("*.py") if p.stem != "__init__")


def _shared_imports(tree: ast.Module):
    """Yield (imported shared module, node) for every import of a shared module in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "shared":
                for alias in node.names:
                    yield alias.name, node
            elif node.module.startswith("shared."):
                yield node.module.split(".")[1], node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("shared."):
                    yield alias.name.split(".")[1], node


def _function_level_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes that sit inside a function or method body."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def _parse(module: str) -> ast.Module:
    return ast.parse((SHARED / f"{module}.py").read_text(encoding="utf-8"))


def _import_graph() -> dict[str, set[str]]:
    return {
        module: {name for name, _ in _shared_imports(_parse(module)) if name != "__version__"}
        for module in MODULES
    }


def test_every_module_has_a_layer():
    missing = [module for module in MODULES if module not in LAYER_OF]
    assert not missing, f"give {missing} a layer in LAYERS of tests/test_layering.py"


@pytest.mark.parametrize("module", MODULES)
def test_shared_imports_sit_at_module_level(module):
    tree = _parse(module)
    inside = _function_level_nodes(tree)
    hidden = [f"line {node.lineno}: shared.{name}" for name, node in _shared_imports(tree) if id(node) in inside]
    assert not hidden, f"shared/{module}.py imports inside a function ({hidden}); import at the top"


@pytest.mark.parametrize("module", [m for m in MODULES if m in LAYER_OF])
def test_no_module_imports_a_later_chapter(module):
    later = sorted(
        name for name in _import_graph()[module] if name in LAYER_OF and LAYER_OF[name] > LAYER_OF[module]
    )
    assert not later, f"shared.{module} imports {later}, which come later in the course"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None."""
    state: dict[str, str] = {}  # module -> "open" while on the current path, "done" after

    def visit(module, path):
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            if state.get(name) == "open":
                return path[path.index(name) :] + [name]
            if name not in state and (cycle := visit(name, path + [name])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycles():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_a_cycle_and_a_hidden_import():
    # The helpers above must be able to fail: a function-level import and a three-module cycle.
    tree = ast.parse("import os\nfrom shared.utils import set_seed\ndef f():\n    from shared.model import GPTModel\n")
    inside = _function_level_nodes(tree)
    assert [name for name, node in _shared_imports(tree) if id(node) in inside] == ["model"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
