"""A simulated Colab run: a notebook alone in a folder, in a Python that has only what Colab
preinstalls and this course needs (torch, pandas, matplotlib, ipykernel, nbclient), must set the
course up by itself in its first cell and run to the end in that one kernel.

The course is served from a bare repository made from the working tree as it is on disk
(tracked and untracked files that .gitignore does not exclude), so the test checks the
setup cell and notebooks being edited, not the last commit. Packages come from the index pip
is configured with, the same one CI installs from.
"""

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COLAB_PREINSTALLED = [f"torch=={torch.__version__.split('+')[0]}", "pandas", "matplotlib", "ipykernel", "nbclient"]
# What the setup cell must bring in itself; the simulated runtime must not have any of them.
NOT_PREINSTALLED = ["shared", "tiktoken", "regex", "safetensors"]
BANNER_CELL = "from shared.utils import banner\n\nbanner()"
# Executes a notebook in one kernel from top to bottom and saves it with its outputs.
RUNNER = """
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                 resources={"metadata": {"path": sys.argv[2]}})
try:
    client.execute()
finally:
    nbformat.write(notebook, sys.argv[1])
"""


def _git(*args, cwd=ROOT):
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def colab_python(tmp_path_factory):
    """A fresh virtual environment with Colab's relevant packages and nothing of the course."""
    folder = tmp_path_factory.mktemp("colab") / "venv"
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-compile", *COLAB_PREINSTALLED],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    # Run from the venv's folder: from the repository root, `python -c` would find ./shared.
    probe = "import importlib.util as u, sys; print([n for n in sys.argv[1:] if u.find_spec(n)])"
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([python, "-c", probe, *NOT_PREINSTALLED], env=clean_env, cwd=folder, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert found == "[]", f"the simulated Colab runtime already has {found}"
    return python


@pytest.fixture(scope="module")
def course_url(tmp_path_factory):
    """file:// URL of a bare repository holding the working tree as it is on disk."""
    bare = tmp_path_factory.mktemp("remote") / "course.git"
    _git("init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    work_tree = ["--git-dir", str(bare), "--work-tree", str(ROOT)]
    _git(*work_tree, "add", "--all")
    _git(*work_tree, "commit", "--quiet", "-m", "working tree under test")
    return bare.as_uri()


def _colab_env(python, course_url, home):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH")}
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",  # as if the venv were activated
        VIRTUAL_ENV=str(python.parent.parent),
        LLMS_REPO_URL=course_url,
        LLMS_QUICK="1",
        MPLBACKEND="Agg",
        # Keep the user's Jupyter and IPython configuration (and kernels) out of the simulated runtime.
        JUPYTER_DATA_DIR=str(home / "jupyter-data"),
        JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
        IPYTHONDIR=str(home / "ipython"),
    )
    return env


def _run_alone(python, course_url, tmp_path, notebook, env_changes=None):
    """Run ``notebook`` (a dict) as the only file of a fresh working directory; return (result, cells)."""
    workdir = tmp_path / "content"
    workdir.mkdir()
    path = workdir / "notebook.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    env = {**_colab_env(python, course_url, tmp_path), **(env_changes or {})}
    result = subprocess.run([python, "-c", RUNNER, path, workdir], env=env, cwd=workdir,
                            capture_output=True, text=True, timeout=1800)
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return result, cells


def _outputs(cell):
    return "".join("".join(out.get("text", "")) for out in cell.get("outputs", []))


def _first_code_cell(cells):
    return next(cell for cell in cells if cell["cell_type"] == "code")


def _course_notebook(relative):
    return json.loads((ROOT / relative).read_text(encoding="utf-8"))


@pytest.mark.parametrize("relative", ["ch02/ch02.ipynb", "ch04/ch04.ipynb"])
def test_chapter_notebook_runs_to_the_end_in_a_fresh_colab_like_runtime(colab_python, course_url, tmp_path,
                                                                        relative):
    result, cells = _run_alone(colab_python, course_url, tmp_path, _course_notebook(relative))
    assert result.returncode == 0, result.stderr[-3000:]
    setup_output = _outputs(_first_code_cell(cells))
    assert f"working in {tmp_path / 'content' / 'course' / Path(relative).parent}" in setup_output
    assert "mode: quick" in setup_output
    assert all(cell.get("execution_count") for cell in cells if cell["cell_type"] == "code")


def test_setup_cell_installs_what_is_missing_and_it_imports_in_the_same_kernel(colab_python, course_url,
                                                                               tmp_path):
    # Missing when the kernel starts: the import below only works if no restart is needed.
    subprocess.run([colab_python, "-m", "pip", "uninstall", "--yes", "--quiet", "tiktoken"], check=True)
    notebook = _course_notebook("ch02/ch02.ipynb")
    setup = _first_code_cell(notebook["cells"])
    check = {**setup, "id": "check", "outputs": [], "execution_count": None,
             "source": "import os\n\nimport tiktoken\n\nimport shared.tokenizer\n\nprint(os.getcwd())"}
    notebook["cells"] = [setup, check]
    result, cells = _run_alone(colab_python, course_url, tmp_path, notebook)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installed tiktoken" in _outputs(cells[0])
    assert _outputs(cells[1]).strip() == str(tmp_path / "content" / "course" / "ch02")


def test_notebook_without_the_setup_cell_fails_at_import_shared(colab_python, course_url, tmp_path):
    notebook = _course_notebook("ch02/ch02.ipynb")
    _first_code_cell(notebook["cells"])["source"] = BANNER_CELL
    result, cells = _run_alone(colab_python, course_url, tmp_path, notebook)
    assert result.returncode != 0
    assert "No module named 'shared'" in result.stderr


@pytest.mark.parametrize(
    "broken, symptom",
    [("no network", "Course setup: git clone failed"), ("no git", "Course setup: git clone could not run")],
)
def test_setup_cell_that_cannot_clone_says_how_to_set_up_by_hand(colab_python, course_url, tmp_path, broken,
                                                                  symptom):
    notebook = _course_notebook("ch02/ch02.ipynb")
    notebook["cells"] = [_first_code_cell(notebook["cells"])]
    if broken == "no network":  # a URL nothing answers at, as git sees it offline
        env = {"LLMS_REPO_URL": (tmp_path / "nowhere.git").as_uri()}
    else:  # a PATH that holds the runtime's Python but no git
        env = {"PATH": str(colab_python.parent)}
    result, _ = _run_alone(colab_python, course_url, tmp_path, notebook, env)
    assert result.returncode != 0
    assert symptom in result.stderr and "To set up by hand: git clone --depth 1" in result.stderr
