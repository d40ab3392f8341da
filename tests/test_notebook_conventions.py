"""House rules every notebook follows (their execution is checked by nbval)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every notebook in the repository, at any depth; hidden folders (.git, .venv, .ipynb_checkpoints)
# and build outputs are not the course's.
NOTEBOOKS = sorted(
    p
    for p in ROOT.rglob("*.ipynb")
    if not any(
        part.startswith(".") or part == "build" or part.endswith(".egg-info")
        for part in p.relative_to(ROOT).parts
    )
)
# A chapter's main notebook is named after its folder (ch03/ch03.ipynb, appendix_A/appendix_A.ipynb);
# bonus notebooks (ch02/bpe-from-scratch.ipynb) and solutions notebooks are not chapter notebooks.
CHAPTER_NOTEBOOKS = [
    p for p in NOTEBOOKS if p.stem == p.parent.name and re.fullmatch(r"ch\d\d|appendix_[A-Z]", p.stem)
]
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _cells(path, cell_type):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return [cell for cell in notebook["cells"] if cell["cell_type"] == cell_type]


def _headings(path):
    return [
        line.strip()
        for cell in _cells(path, "markdown")
        for line in _source(cell).splitlines()
        if line.startswith("#")
    ]


def _source(cell):
    return "".join(cell["source"])


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_every_chapter_folder_has_a_readme():
    for folder in ["ch01", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_A", "appendix_D", "appendix_E"]:
        assert (ROOT / folder / "README.md").is_file(), folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_first_code_cell_prints_the_banner(path):
    assert "banner()" in _source(_cells(path, "code")[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_ends_with_further_reading(path):
    assert any("Further reading" in heading for heading in _headings(path))


def test_chapter_notebooks_are_found():
    assert {"ch03/ch03.ipynb", "ch04/ch04.ipynb"} <= set(_ids(CHAPTER_NOTEBOOKS))


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=_ids(CHAPTER_NOTEBOOKS))
def test_chapter_notebook_has_exercises_before_further_reading(path):
    headings = _headings(path)
    exercises = [i for i, h in enumerate(headings) if re.match(r"#+\s*(\d+\.\s*)?Exercises\b", h)]
    reading = [i for i, h in enumerate(headings) if "Further reading" in h]
    assert exercises, f"{path.name} needs an '## Exercises' section"
    assert reading and exercises[0] < reading[-1], "Exercises come before Further reading"


@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=_ids(CHAPTER_NOTEBOOKS))
def test_chapter_notebook_has_a_solutions_notebook_beside_it(path):
    solutions = path.with_name(f"{path.stem}-solutions.ipynb")
    assert solutions.is_file(), f"missing {solutions.relative_to(ROOT)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_kernelspec_is_the_standard_one(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["metadata"].get("kernelspec") == KERNELSPEC


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_executed_by_ci(path, pytestconfig):
    # CI runs pytest with nbval over the testpaths of pyproject.toml: a notebook outside them, or
    # in a folder that norecursedirs skips, would never be executed.
    relative = path.relative_to(ROOT)
    testpaths = pytestconfig.getini("testpaths")
    assert any(relative.is_relative_to(testpath) for testpath in testpaths), (
        f"{relative} is not under {testpaths}"
    )
    skipped = pytestconfig.getini("norecursedirs")
    for folder in relative.parent.parts:
        assert not any(Path(folder).match(pattern) for pattern in skipped), (
            f"{relative} sits in a skipped folder"
        )


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
