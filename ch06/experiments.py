"""Variants of the spam classifier, one command, one table (ch06 bonus).

    python ch06/experiments.py --quick     # the small random GPT, 2 epochs per variant (minutes on a CPU)
    python ch06/experiments.py             # pretrained GPT-2 small, 5 epochs per variant (hours on a CPU)

Each variant changes one setting of the baseline (last real token, dynamic padding, causal
mask, two outputs with softmax; one trainable block for pretrained GPT-2, all layers for the
random small model) and runs ``finetune_classifier.finetune`` with the same seed. The table
(markdown and JSON: train/validation/test accuracy, trainable parameters, wall time, seed,
settings) goes to a new folder ``ch06/runs/experiments/<date>-<time>/`` unless ``--out-dir``
names one. Only ``--refresh-results`` replaces the table kept in the repository (``ch06/results``),
and only with every variant: a run of some variants (``--only``) writes ``...-partial.md/.json``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from finetune_classifier import finetune
from finetune_classifier import parse_args as parse_args_of_finetune

from shared.utils import atomic_path, exit_on_error, is_quick, run_dir, write_json

HERE = Path(__file__).resolve().parent

# name -> (what it tests, extra command-line flags for finetune_classifier)
VARIANTS = {
    "baseline": ("last real token, dynamic padding, causal mask, 2 outputs", []),
    "first token": ("read the first token instead of the last", ["--pooling", "first"]),
    "mean over real tokens": ("average the outputs of the real tokens", ["--pooling", "mean"]),
    "head only": ("train only the new head", ["--trainable-blocks", "0"]),
    "last block": ("train the last block, final norm and head", ["--trainable-blocks", "1"]),
    "last two blocks": ("train the last two blocks, final norm and head", ["--trainable-blocks", "2"]),
    "all layers": ("train every parameter, embeddings included", ["--trainable-blocks", "all"]),
    "no causal mask": ("bidirectional attention in the classification pass", ["--no-causal-mask"]),
    "one output + BCE": ("one logit, sigmoid and binary cross-entropy", ["--num-classes", "1"]),
    "pad to longest (book)": ("every batch padded to the longest training message", ["--padding", "longest"]),
    "pad to full context": ("every batch padded to the context length", ["--padding", "context"]),
    "pad to full context, read final position": (
        "padded to the context length and read at [:, -1] (the book's 1024-padding experiment)",
        ["--padding", "context", "--pooling", "last_position"],
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small random GPT (also LLMS_QUICK=1)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--only", nargs="+", help="run only these variants (names as in the table)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: a new folder in ch06/runs/experiments/"
    )
    parser.add_argument(
        "--refresh-results",
        action="store_true",
        help="run every variant and replace the table in ch06/results",
    )
    args = parser.parse_args(argv)
    for name in args.only or ():
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; the variants are: {', '.join(VARIANTS)}")
    results = (HERE / "results").resolve()
    if args.refresh_results and (args.only or args.out_dir):
        parser.error("--refresh-results runs every variant into ch06/results: leave out --only and --out-dir")
    if args.out_dir is not None and args.out_dir.resolve() == results:
        parser.error(f"{args.out_dir} holds the committed table; pass --refresh-results to replace it")
    return args


def run_variants(names: list[str], shared_flags: list[str]) -> list[dict]:
    """Finetune each named variant; one table row each."""
    rows = []
    for name in names:
        meaning, flags = VARIANTS[name]
        print(f"\n=== {name}: {meaning}")
        _, report = finetune(parse_args_of_finetune([*flags, *shared_flags]))
        rows.append(
            {
                "variant": name,
                "meaning": meaning,
                "train_acc": report["accuracy"]["train"],
                "validation_acc": report["accuracy"]["validation"],
                "test_acc": report["accuracy"]["test"],
                "trainable_parameters": report["trainable_parameters"],
                "train_seconds": report["train_seconds"],
                "model": report["model"],
                "device": report["device"],
                "settings": report["settings"],
            }
        )
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    quick = args.quick or is_quick()
    out_dir = run_dir(args.out_dir, HERE / "runs" / "experiments", committed=HERE / "results", refresh=args.refresh_results)
    shared_flags = ["--seed", str(args.seed), "--no-save", *(["--quick"] if quick else [])]
    if args.device:
        shared_flags += ["--device", args.device]
    names = [name for name in VARIANTS if not args.only or name in args.only]
    rows = run_variants(names, shared_flags)
    stem = ("experiments-quick" if quick else "experiments") + (
        "" if len(rows) == len(VARIANTS) else "-partial"
    )
    write_table(rows, out_dir, stem, quick)
    return rows


def write_table(rows: list[dict], out_dir: Path, stem: str, quick: bool) -> None:
    """The markdown table (printed too) and the JSON of every row, as ``<stem>.md`` and ``.json``."""
    first = rows[0]
    settings = first["settings"]
    lines = [
        f"Model: {first['model']}. Device: {first['device']}, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}.",
        f"Shared settings: {settings['epochs']} epochs, lr {settings['lr']}, weight decay {settings['weight_decay']}, "
        f"batch {settings['batch_size']}, seed {settings['seed']}, balanced SMS split (1,045 / 149 / 300).",
        "",
        "| variant | train acc | val acc | test acc | trainable params | train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['train_acc'] * 100:.2f}% | {row['validation_acc'] * 100:.2f}% | "
            f"{row['test_acc'] * 100:.2f}% | {row['trainable_parameters']:,} | {row['train_seconds']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print("\n" + table)

    payload = {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    write_json(out_dir / f"{stem}.json", payload)
    with atomic_path(out_dir / f"{stem}.md") as tmp:
        tmp.write_text(table)
    print(f"wrote {out_dir / stem}.md and .json")


if __name__ == "__main__":
    exit_on_error(main)
