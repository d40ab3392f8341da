"""House rules every notebook follows (their execution is checked by nbval)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in ROOT.glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _cells(path, cell_type):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return [cell for cell in notebook["cells"] if cell["cell_type"] == cell_type]


def _source(cell):
    return "".join(cell["source"])


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_every_chapter_folder_has_a_readme():
    for folder in ["ch01", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_A", "appendix_D"]:
        assert (ROOT / folder / "README.md").is_file(), folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_first_code_cell_prints_the_banner(path):
    assert "banner()" in _source(_cells(path, "code")[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_ends_with_further_reading(path):
    headings = [
        line
        for cell in _cells(path, "markdown")
        for line in _source(cell).splitlines()
        if line.startswith("#")
    ]
    assert any("Further reading" in heading for heading in headings)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_no_saved_errors_and_was_run_in_order(path):
    counts = []
    for cell in _cells(path, "code"):
        assert all(out.get("output_type") != "error" for out in cell.get("outputs", [])), _source(cell)[:80]
        if cell.get("execution_count") is not None:
            counts.append(cell["execution_count"])
    # Outputs come from one clean top-to-bottom run: execution counts 1, 2, 3, ...
    assert counts == list(range(1, len(counts) + 1))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_uses_no_test_only_dependency_or_machine_path(path):
    for cell in _cells(path, "code"):
        source = _source(cell)
        assert not re.search(r"^\s*(import|from)\s+transformers\b", source, re.M), "transformers is test-only"
        assert "sys.path" not in source, "import shared as an installed package, not via sys.path"
        assert not re.search(r"['\"]/(home|root|Users|work|tmp)/", source), "no absolute paths"


# What JupyterLab 4 writes for the ipykernel kernel. Any other display name is rewritten by
# JupyterLab when the notebook opens, which marks it modified before anything has run.
JUPYTERLAB_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_stores_the_kernelspec_jupyterlab_expects(path):
    metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    assert metadata.get("kernelspec") == JUPYTERLAB_KERNELSPEC
