# @title Set up the course (fetches it first when `shared` is missing, as on Colab) { display-mode: "form" }
# This notebook's place in the course (tools/sync_setup_cell.py writes it).
COURSE_NOTEBOOK = "chNN/chNN.ipynb"
import importlib.util
import os


def _fetch_course(notebook):
    """Clone the course beside this kernel, install what it lacks, import `shared`, cd into the chapter."""
    import importlib.metadata
    import re
    import subprocess
    import sys
    from pathlib import Path

    url = os.environ.get("LLMS_REPO_URL") or "https://github.com/REPLACE-WITH-OWNER/llm-from-scratch-course.git"
    clone = Path.cwd() / Path(url.rstrip("/")).name.removesuffix(".git")
    fix = (
        f"To set up by hand: git clone --depth 1 {url} {clone}; pip install -r {clone}/requirements.txt "
        "(keep the runtime's torch); then run this cell again."
    )

    def run(what, command, minutes):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60 * minutes)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"Course setup: {what} could not run ({error}). {fix}") from None
        if result.returncode != 0:
            raise RuntimeError(f"Course setup: {what} failed: {result.stderr.strip()[-600:]}\n{fix}")

    did = []
    if not (clone / "shared").is_dir():
        run("git clone", ["git", "clone", "--quiet", "--depth", "1", url, str(clone)], minutes=5)
        did.append(f"cloned {url} into {clone}")
    # torch stays the runtime's own build; jupyterlab, nbval and pytest run notebooks, not inside them.
    not_for_the_kernel = {"torch", "jupyterlab", "nbval", "pytest"}
    missing = []
    for line in (clone / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
        if not name or line.startswith("-") or name.lower() in not_for_the_kernel:
            continue
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
    if missing:
        run("pip install", [sys.executable, "-m", "pip", "install", "--quiet", *missing], minutes=10)
        importlib.invalidate_caches()
        did.append(f"installed {', '.join(missing)}")
    # This kernel imports `shared` from the clone; child processes (scripts, torchrun) inherit PYTHONPATH.
    sys.path.insert(0, str(clone))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")]))
    os.chdir(clone / Path(notebook).parent)
    print(f"Course setup: {'; '.join(did or ['found the course at ' + str(clone)])}; working in {Path.cwd()}")


if importlib.util.find_spec("shared") is None:
    _fetch_course(COURSE_NOTEBOOK)
from shared.utils import banner

banner()
