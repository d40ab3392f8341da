"""House rules every notebook follows (their execution is checked by nbval)."""

import importlib.util
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
_spec = importlib.util.spec_from_file_location("sync_setup_cell", ROOT / "tools" / "sync_setup_cell.py")
sync_setup_cell = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_setup_cell)
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
def test_first_code_cell_is_the_canonical_setup_cell(path):
    expected = sync_setup_cell.setup_cell_source(path.relative_to(ROOT).as_posix())
    assert _source(_cells(path, "code")[0]) == expected, (
        f"{path.name}: the first code cell differs from tools/setup_cell.py; run python tools/sync_setup_cell.py"
    )


def test_sync_setup_cell_replaces_the_banner_cell_once_and_keeps_its_output(tmp_path):
    notebook = tmp_path / "ch09" / "ch09.ipynb"
    notebook.parent.mkdir()
    banner_cell = {"cell_type": "code", "execution_count": 1, "id": "a1", "metadata": {},
                   "outputs": [{"name": "stdout", "output_type": "stream", "text": ["python: 3\n"]}],
                   "source": ["from shared.utils import banner\n", "\n", "banner()"]}
    title = {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": ["# Chapter 9"]}
    notebook.write_text(json.dumps({"cells": [title, banner_cell], "metadata": {}, "nbformat": 4,
                                    "nbformat_minor": 5}, indent=1) + "\n")
    assert sync_setup_cell.sync(notebook, root=tmp_path) == "replaced the first code cell"
    first = _cells(notebook, "code")[0]
    assert _source(first) == sync_setup_cell.setup_cell_source("ch09/ch09.ipynb")
    assert 'COURSE_NOTEBOOK = "ch09/ch09.ipynb"' in _source(first)
    assert first["outputs"] == banner_cell["outputs"] and first["execution_count"] == 1
    written = notebook.read_text()
    assert sync_setup_cell.sync(notebook, root=tmp_path) is None
    assert notebook.read_text() == written


def test_sync_setup_cell_puts_the_cell_before_an_unknown_first_cell(tmp_path):
    notebook = tmp_path / "extra.ipynb"
    own = {"cell_type": "code", "execution_count": None, "id": "b1", "metadata": {}, "outputs": [],
           "source": ["x = 1"]}
    notebook.write_text(json.dumps({"cells": [own], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    sync_setup_cell.sync(notebook, root=tmp_path)
    assert [_source(cell) for cell in _cells(notebook, "code")] == [
        sync_setup_cell.setup_cell_source("extra.ipynb"), "x = 1"
    ]


COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]+")
READMES = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md"))]


@pytest.mark.parametrize("readme", READMES, ids=_ids(READMES))
def test_colab_links_open_existing_notebooks_of_the_course_repository(readme):
    # Every link is built from the one repository URL in tools/setup_cell.py.
    for link in COLAB_LINK.findall(readme.read_text(encoding="utf-8")):
        notebook = link.split("/blob/main/", 1)[-1]
        assert link == sync_setup_cell.colab_url(notebook), f"{link}: run python tools/sync_setup_cell.py"
        assert (ROOT / notebook).is_file(), f"{link} opens {notebook}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_a_colab_badge_in_the_chapter_map_and_its_chapter_readme(path):
    link = sync_setup_cell.colab_url(path.relative_to(ROOT).as_posix())
    badge = f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})"
    for readme in [ROOT / "README.md", path.parent / "README.md"]:
        links = COLAB_LINK.findall(readme.read_text(encoding="utf-8")) if readme.is_file() else []
        assert link in links, f"{readme.relative_to(ROOT)} lacks a badge for {path.name}; add {badge}"


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
    setup_cell = sync_setup_cell.setup_cell_source(path.relative_to(ROOT).as_posix())
    for cell in _cells(path, "code"):
        source = _source(cell)
        assert not re.search(r"^\s*(import|from)\s+transformers\b", source, re.M), "transformers is test-only"
        # The canonical setup cell alone may touch sys.path: on Colab it imports `shared` from its clone.
        if source != setup_cell:
            assert "sys.path" not in source, "import shared as an installed package, not via sys.path"
        assert not re.search(r"['\"]/(home|root|Users|work|tmp)/", source), "no absolute paths"


# What JupyterLab 4 writes for the ipykernel kernel. Any other display name is rewritten by
# JupyterLab when the notebook opens, which marks it modified before anything has run.
JUPYTERLAB_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_stores_the_kernelspec_jupyterlab_expects(path):
    metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    assert metadata.get("kernelspec") == JUPYTERLAB_KERNELSPEC
