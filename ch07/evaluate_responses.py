"""Score a JSON of model responses: ROUGE-L and exact match offline, and optionally an LLM judge.

The input is what ``ch07/finetune_instructions.py`` writes: a list of entries with
``instruction``, ``input``, ``output`` (the reference) and a response (``--response-key``,
default ``model_response``). Prints the averages, the judge's unscored count and a histogram of
its scores, and writes a JSON report, ``<responses>-report.json``, next to the responses (inside
the finetuning run's folder) or into ``--out-dir``.

Examples::

    python ch07/evaluate_responses.py ch07/runs/finetune_instructions/<run>/test-responses.json
    python ch07/evaluate_responses.py <run>/test-responses.json --judge-url http://localhost:11434
    python ch07/evaluate_responses.py responses.json --judge-url http://localhost:8080/v1 --judge-model qwen2.5

With ``--judge-url`` and no server there, the offline metrics are still reported, with a note on
how to start a judge server; the exit code is then 2, as it is when the judge failed to answer
some requests (those entries stay unscored; after three failures in a row, or once
``--judge-deadline`` has passed, the rest are not sent). Any other error exits with 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from shared.data import DataValidationError, validate_instruction_entries
from shared.instruction import PROMPT_STYLES, exact_match, rouge_l
from shared.judge import DEFAULT_JUDGE_MODEL, make_judge, score_responses
from shared.utils import write_json


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds (e.g. 60)")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("responses", type=Path, help="JSON list of entries with responses")
    parser.add_argument("--response-key", default="model_response")
    parser.add_argument(
        "--judge-url", help="Ollama (http://localhost:11434) or OpenAI-compatible (.../v1) server"
    )
    parser.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL)
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds per judge request")
    parser.add_argument(
        "--judge-deadline", type=seconds, default=3600.0, help="seconds for all judge requests together"
    )
    parser.add_argument(
        "--style", default="alpaca", choices=PROMPT_STYLES, help="how the judge sees the task"
    )
    parser.add_argument(
        "--out-dir", type=Path, help="folder for <responses>-report.json (default: the responses' folder)"
    )
    return parser.parse_args(argv)


def load_responses(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: run ch07/finetune_instructions.py first, or pass the right file."
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path} is not valid JSON: {error}") from error
    try:
        validate_instruction_entries(entries, source=str(path))
    except DataValidationError as error:
        raise SystemExit(str(error)) from error
    if not entries:
        raise SystemExit(
            f"{path} holds no entries (an empty list): pass the responses file of a finetuning run."
        )
    missing = [i for i, entry in enumerate(entries) if not isinstance(entry.get(key), str)]
    if missing:
        raise SystemExit(f"{path}: entries {missing[:5]} have no text under {key!r} (see --response-key).")
    return entries


def text_histogram(counts: dict[str, int], width: int = 40) -> str:
    top = max(counts.values()) or 1
    return "\n".join(
        f"{label:>9} | {'#' * round(width * n / top):<{width}} {n}" for label, n in counts.items()
    )


def judge_report(entries: list[dict], judge, args: argparse.Namespace, per_entry: list[dict]) -> dict:
    """Score with the judge, print the summary, add each entry's score to ``per_entry``."""
    scores = score_responses(
        entries, judge, args.response_key, args.style, progress=True, deadline=args.judge_deadline
    )
    print(f"\njudge {judge}: average {scores.average}, unscored {scores.unscored} of {len(entries)}")
    print(text_histogram(scores.histogram()))
    if scores.failures:
        first = next(e for e, r in zip(scores.errors, scores.replies, strict=True) if e and r is None)
        print(f"error: the judge failed to score {scores.failures} entries, e.g.: {first}")
    for row, score, reply, error in zip(per_entry, scores.scores, scores.replies, scores.errors, strict=True):
        row.update(judge_score=score, judge_reply=reply, judge_error=error)
    return {
        "url": args.judge_url,
        "model": args.judge_model,
        "average": scores.average,
        "unscored": scores.unscored,
        "failures": scores.failures,
        "histogram": scores.histogram(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    entries = load_responses(args.responses, args.response_key)
    rouge = [rouge_l(e[args.response_key], e["output"]) for e in entries]
    exact = [exact_match(e[args.response_key], e["output"]) for e in entries]
    report = {
        "responses": str(args.responses),
        "count": len(entries),
        "rouge_l": sum(rouge) / len(rouge) if rouge else None,
        "exact_match": sum(exact) / len(exact) if exact else None,
        "per_entry": [{"rouge_l": r, "exact_match": x} for r, x in zip(rouge, exact, strict=True)],
    }
    print(
        f"{len(entries)} responses: ROUGE-L {report['rouge_l']:.3f}, exact match {report['exact_match']:.1%}"
    )

    status = 0
    if args.judge_url:
        judge = make_judge(args.judge_url, args.judge_model, timeout=args.timeout)
        problem = judge.check()
        if problem is not None:
            print(f"\nNo judge at {args.judge_url}:\n{problem}")
            report["judge"] = {"url": args.judge_url, "error": problem.splitlines()[0]}
            status = 2
        else:
            report["judge"] = judge_report(entries, judge, args, report["per_entry"])
            status = 2 if report["judge"]["failures"] else 0

    out = (args.out_dir or args.responses.parent) / f"{args.responses.stem}-report.json"
    write_json(out, report)
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
