"""Write the canonical setup cell (tools/setup_cell.py) as the first code cell of every notebook,
and point the README's "Open in Colab" badges at the repository URL written in that cell.

    python tools/sync_setup_cell.py           # rewrite the notebooks and READMEs that differ
    python tools/sync_setup_cell.py --check   # only list them; exit 1 when any differs

Idempotent: a notebook that already starts with the canonical cell is not touched. The only
notebook-specific line is ``COURSE_NOTEBOOK = "<path>"``: on Colab the kernel cannot see which
notebook it runs, and the cell needs it to change into the chapter's folder. A replaced cell keeps
its saved output and execution count: where ``shared`` imports, the setup cell prints exactly
what the banner cell before it printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANONICAL = Path(__file__).resolve().parent / "setup_cell.py"
NOTEBOOK_LINE = re.compile(r'^COURSE_NOTEBOOK = ".*"$', re.M)
URL_LINE = re.compile(r'or "(https://github\.com/([^/"]+)/([^/"]+?)(?:\.git)?)"')
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/main/")
# What the first code cell was before the setup cell existed.
BANNER_CELL = "from shared.utils import banner\n\nbanner()"


def course_notebooks(root: Path = ROOT) -> list[Path]:
    """Every notebook in the course; hidden folders and build outputs are not the course's."""
    return sorted(
        p
        for p in root.rglob("*.ipynb")
        if not any(
            part.startswith(".") or part == "build" or part.endswith(".egg-info")
            for part in p.relative_to(root).parts
        )
    )


def setup_cell_source(notebook: str) -> str:
    """The canonical cell for the notebook at ``notebook`` (a path relative to the repository root)."""
    canonical = CANONICAL.read_text(encoding="utf-8").rstrip("\n")
    if len(NOTEBOOK_LINE.findall(canonical)) != 1:
        raise ValueError(f"{CANONICAL} must hold exactly one line COURSE_NOTEBOOK = \"...\"")
    return NOTEBOOK_LINE.sub(lambda _: f"COURSE_NOTEBOOK = {json.dumps(notebook)}", canonical)


def repository() -> tuple[str, str, str]:
    """(clone URL, owner, name) of the course on GitHub, as written once in the canonical cell."""
    match = URL_LINE.search(CANONICAL.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{CANONICAL} has no 'or \"https://github.com/<owner>/<name>.git\"' default URL")
    return match.group(1), match.group(2), match.group(3)


def colab_url(notebook: str) -> str:
    """The "Open in Colab" link of a notebook (path relative to the repository root)."""
    _, owner, name = repository()
    return f"https://colab.research.google.com/github/{owner}/{name}/blob/main/{notebook}"


def sync_badges(readme: Path, write: bool = True) -> str | None:
    """Point every Colab link in ``readme`` at the repository of the canonical cell."""
    text = readme.read_text(encoding="utf-8")
    updated = COLAB_LINK.sub(colab_url(""), text)
    if updated == text:
        return None
    if write:
        readme.write_text(updated, encoding="utf-8")
    return "pointed its Colab badges at the repository URL"


def _is_setup_cell(source: str) -> bool:
    return source == BANNER_CELL or NOTEBOOK_LINE.search(source) is not None


def sync(path: Path, root: Path = ROOT, write: bool = True) -> str | None:
    """Make the notebook's first code cell the canonical one; return what changed, or None."""
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    wanted = setup_cell_source(path.relative_to(root).as_posix())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    if code and "".join(code[0]["source"]) == wanted:
        return None
    lines = wanted.splitlines(keepends=True)
    if code and _is_setup_cell("".join(code[0]["source"])):
        code[0]["source"] = lines
        change = "replaced the first code cell"
    else:
        # An unknown first cell is the author's own code: keep it and put the setup cell before it.
        cell = {"cell_type": "code", "execution_count": None, "id": uuid.uuid4().hex[:8],
                "metadata": {}, "outputs": [], "source": lines}
        first = notebook["cells"].index(code[0]) if code else len(notebook["cells"])
        notebook["cells"].insert(first, cell)
        change = "inserted the setup cell (not yet executed: re-run the notebook)"
    if write:
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return change


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook differs")
    args = parser.parse_args(argv)
    changed = 0
    readmes = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md"))]
    for path, sync_one in [*((p, sync) for p in course_notebooks()), *((p, sync_badges) for p in readmes)]:
        change = sync_one(path, write=not args.check)
        if change:
            changed += 1
            print(f"{path.relative_to(ROOT)}: {'differs' if args.check else change}")
    print(f"{changed} file(s) {'differ' if args.check else 'updated'}; the setup cell is {CANONICAL.relative_to(ROOT)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
