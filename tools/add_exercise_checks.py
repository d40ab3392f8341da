"""Give every exercise a "check your answer" cell (issue 26).

In each chapter notebook the one markdown cell that lists the exercises becomes, per exercise, a
markdown cell with its text, a code cell with a placeholder for the answer (``...`` or a
function that raises NotImplementedError) and a code cell that calls
``shared.exercises.check``. Unanswered, the check prints "not answered yet", so the notebook
still runs top to bottom (nbval). In each solutions notebook a cell that runs the same check on
the solution goes after the solution's last code cell.

Running it again changes nothing: a notebook whose exercises are already split is left alone,
and a solution that already has its check cell is skipped. New cells have no outputs: run the
solutions notebooks afterwards (the main notebooks can stay as they are; their new cells are
for the learner to run).

    python tools/add_exercise_checks.py            # dry run: lists what would change
    python tools/add_exercise_checks.py --write    # rewrites the notebooks
    python tools/add_exercise_checks.py --root /tmp/copy --write   # on a copy of the repository
"""

import argparse
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path

from exercise_cells import PLACEHOLDERS, SOLUTION_CHECKS

from shared.exercises import EXERCISES

CHAPTERS = ["ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_A", "appendix_D", "appendix_E"]
IMPORT = "from shared.exercises import check"
EXERCISES_HEADING = re.compile(r"^(#+)\s*(\d+\.\s*)?Exercises\b")
ITEM = re.compile(r"^(\d+)\.\s+(.*)")
HOW_TO = (
    "Each exercise has a cell for your answer and a cell that checks it: replace the `...` (or write\n"
    "the function's body), then run the check. It says ✓ or ✗ with a hint on what to look at, and\n"
    "never shows the solution."
)


def cell(kind: str, source: str, key: str) -> dict:
    """A notebook cell; its id comes from ``key`` so that the same cell always gets the same id."""
    lines = source.strip("\n").splitlines(keepends=True)
    new = {
        "cell_type": kind,
        "id": hashlib.sha1(key.encode()).hexdigest()[:8],
        "metadata": {},
        "source": lines,
    }
    if kind == "code":
        new.update(execution_count=None, outputs=[])
    return new


def source(notebook_cell: dict) -> str:
    return "".join(notebook_cell["source"])


def split_exercises(text: str):
    """(before, heading and intro, [(number, item text)], after) of the cell that lists the exercises."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if EXERCISES_HEADING.match(line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    first_item = next((i for i in range(start, end) if ITEM.match(lines[i])), end)
    items = []
    for line in lines[first_item:end]:
        found = ITEM.match(line)
        if found:
            items.append([int(found.group(1)), [found.group(2)]])
        elif items:
            items[-1][1].append(line)
    texts = [
        (number, (body[0] + "\n" + textwrap.dedent("\n".join(body[1:]))).strip()) for number, body in items
    ]
    before, intro, after = (
        "\n".join(lines[:start]),
        "\n".join(lines[start:first_item]),
        "\n".join(lines[end:]),
    )
    return before.strip(), intro.strip(), texts, after.strip()


def exercise_markdown(number: int, text: str, level: str) -> str:
    """'**Title.** Body' -> a heading 'Exercise n: Title' and the body."""
    found = re.match(r"\*\*(.+?)\.?\*\*\s*(.*)", text, re.S)
    title, body = (found.group(1), found.group(2)) if found else ("", text)
    return (
        f"{level}# Exercise {number}: {title}\n\n{body}".rstrip()
        if title
        else f"{level}# Exercise {number}\n\n{body}"
    )


def exercise_titles(notebook: dict) -> dict[int, str]:
    """{number: title} of a chapter notebook's exercises, before or after they were split."""
    titles = {}
    for c in notebook["cells"]:
        text = source(c) if c["cell_type"] == "markdown" else ""
        for number, title in re.findall(r"^#+\s*Exercise (\d+): (.+)$", text, re.M):
            titles[int(number)] = title.strip()
        if any(EXERCISES_HEADING.match(line) for line in text.splitlines()):
            for number, item in split_exercises(text)[2]:
                found = re.match(r"\*\*(.+?)\.?\*\*", item)
                titles[number] = found.group(1) if found else ""
    return titles


def checkable(chapter: str, titles: dict[int, str]) -> dict[int, str]:
    """{number: exercise id} of the exercises whose text is the one the check was written for."""
    ids = {}
    for number, title in titles.items():
        exercise_id = f"{chapter}.{number}"
        if exercise_id in EXERCISES and title.lower().rstrip(".") == EXERCISES[exercise_id].title.lower():
            ids[number] = exercise_id
    return ids


def add_to_main(notebook: dict, chapter: str, ids: dict[int, str]) -> list[str]:
    """Split the exercises cell of a chapter notebook; returns what was done (empty: nothing)."""
    cells = notebook["cells"]
    if any(IMPORT in source(c) for c in cells if c["cell_type"] == "code"):
        return []
    index = next(
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "markdown"
        and any(EXERCISES_HEADING.match(line) for line in source(c).splitlines())
    )
    before, intro, items, after = split_exercises(source(cells[index]))
    level = EXERCISES_HEADING.match(intro).group(1)
    new = [
        cell("markdown", f"{intro}\n\n{HOW_TO}", f"{chapter}:intro"),
        cell("code", IMPORT, f"{chapter}:import"),
    ]
    done, missing = [], []
    for number, text in items:
        exercise_id = f"{chapter}.{number}"
        new.append(cell("markdown", exercise_markdown(number, text, level), f"{exercise_id}:text"))
        if number not in ids:  # no check, or one written for another exercise text
            missing.append(exercise_id)
            continue
        new.append(cell("code", PLACEHOLDERS[exercise_id], f"{exercise_id}:answer"))
        new.append(
            cell("code", f'check("{exercise_id}", {answer_name(exercise_id)});', f"{exercise_id}:check")
        )
        done.append(exercise_id)
    if after:
        new.append(cell("markdown", after, f"{chapter}:after"))
    if before:
        cells[index]["source"] = before.splitlines(keepends=True)
        cells[index + 1 : index + 1] = new
    else:
        cells[index : index + 1] = new
    return [f"split {len(items)} exercises, check cells for {', '.join(done)}"] + [
        f"WARNING: no check for {exercise_id} (none written for this exercise's text)"
        for exercise_id in missing
    ]


def answer_name(exercise_id: str) -> str:
    """The name the placeholder defines: 'answer', or the function it stubs."""
    found = re.search(r"^def (\w+)\(", PLACEHOLDERS[exercise_id], re.M)
    return found.group(1) if found else "answer"


def solution_span(cells: list[dict], number: int) -> tuple[int, int] | None:
    """Cell indexes [start, end) of 'Exercise <number>' in a solutions notebook (ch07 writes '7.1')."""
    heading = re.compile(rf"^#+\s*Exercise\s+(\d+\.)?{number}\b", re.M)
    start = next(
        (i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and heading.search(source(c))), None
    )
    if start is None:
        return None
    later = re.compile(r"^#+\s", re.M)
    end = next(
        (
            i
            for i in range(start + 1, len(cells))
            if cells[i]["cell_type"] == "markdown" and later.search(source(cells[i]))
        ),
        len(cells),
    )
    return start, end


def add_to_solutions(notebook: dict, ids: dict[int, str]) -> list[str]:
    """Put a check cell after each solution; returns what was done (empty: nothing)."""
    cells = notebook["cells"]
    done = []
    for number, exercise_id in sorted(ids.items()):
        if any(f'check("{exercise_id}"' in source(c) for c in cells if c["cell_type"] == "code"):
            continue
        span = solution_span(cells, number)
        codes = [i for i in range(*span) if cells[i]["cell_type"] == "code"] if span else []
        if not codes:
            done.append(f"WARNING: no solution code found for {exercise_id}")
            continue
        imported = any(IMPORT in source(c) for c in cells)
        # A solution that fails its own check must fail the notebook's run (nbval), not just print ✗.
        text = re.sub(
            r"^check\((.*)\);\Z",
            r'assert check(\1), "the solution fails its check"',
            SOLUTION_CHECKS[exercise_id].strip(),
            flags=re.M | re.S,
        )
        gap = "\n\n\n" if text.startswith(("def ", "class ")) else "\n\n"  # as ruff's isort wants
        text = text if imported else f"{IMPORT}{gap}{text}"
        cells.insert(codes[-1] + 1, cell("code", text, f"{exercise_id}:solution-check"))
        done.append(f"check cell for {exercise_id}")
    return done


def process(folder: Path, chapter: str, write: bool) -> int:
    """Change a chapter's two notebooks; returns how many changed."""
    paths = [folder / f"{chapter}.ipynb", folder / f"{chapter}-solutions.ipynb"]
    notebooks = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    ids = checkable(chapter, exercise_titles(notebooks[0]))
    changed = 0
    for path, notebook, add in zip(paths, notebooks, [add_to_main, add_to_solutions], strict=True):
        done = add(notebook, chapter, ids) if add is add_to_main else add(notebook, ids)
        for line in done:
            print(f"{path}: {line}")
        if any(not line.startswith("WARNING") for line in done):
            changed += 1
            if write:
                path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the repository (or a copy of it) whose notebooks to change",
    )
    parser.add_argument(
        "--write", action="store_true", help="rewrite the notebooks (default: only list the changes)"
    )
    args = parser.parse_args(argv)
    errors = 0
    changed = 0
    for chapter in CHAPTERS:
        try:
            changed += process(args.root / chapter, chapter, args.write)
        except (OSError, ValueError, StopIteration) as error:
            print(f"{args.root / chapter}: ERROR {type(error).__name__}: {error}", file=sys.stderr)
            errors += 1
    verb = "changed" if args.write else "would change (run with --write)"
    print(f"{changed} notebooks {verb}; {errors} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
