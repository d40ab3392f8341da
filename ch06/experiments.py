"""Variants of the spam classifier, one command, one table (ch06 bonus).

    python ch06/experiments.py --quick     # the small random GPT, 2 epochs per variant (minutes on a CPU)
    python ch06/experiments.py             # pretrained GPT-2 small, 5 epochs per variant (hours on a CPU)

Each variant changes one setting of the baseline (last real token, dynamic padding, causal
mask, two outputs with softmax; one trainable block for pretrained GPT-2, all layers for the
random small model) and runs ``finetune_classifier.finetune`` with the same seed. The table
(markdown and JSON: train/validation/test accuracy, trainable parameters, wall time, seed,
settings) goes to a new folder ``ch06/runs/experiments/<date>-<time>/`` unless ``--out-dir``
names one; ``--out-dir ch06/results`` refreshes the table kept in the repository.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from finetune_classifier import finetune, parse_args

from shared.utils import atomic_path, is_quick, run_dir, write_json

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


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small random GPT (also LLMS_QUICK=1)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these variants (names as in the table)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: a new folder in ch06/runs/experiments/"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; the variants are {list(VARIANTS)}")
    quick = args.quick or is_quick()
    out_dir = run_dir(args.out_dir, HERE / "runs" / "experiments")
    shared_flags = ["--seed", str(args.seed), "--no-save", *(["--quick"] if quick else [])]
    if args.device:
        shared_flags += ["--device", args.device]

    rows = []
    for name, (meaning, flags) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        print(f"\n=== {name}: {meaning}")
        run_args = parse_args([*flags, *shared_flags])
        _, report = finetune(run_args)
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

    stem = "experiments-quick" if quick else "experiments"
    payload = {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    write_json(out_dir / f"{stem}.json", payload)
    with atomic_path(out_dir / f"{stem}.md") as tmp:
        tmp.write_text(table)
    print(f"wrote {out_dir / stem}.md and .json")
    return rows


if __name__ == "__main__":
    main()
