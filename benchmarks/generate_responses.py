"""Benchmark: generating responses to a batch of instruction prompts, ours vs the book's approach.

The book (ch07) answers the test prompts one at a time with its ``generate`` (ch05), which
recomputes the whole sequence for every new token (no cache), on its ``GPTModel`` (ch04). Ours
is ``shared.instruction.generate_batch_ids``: prompts of different lengths padded on the left
into one batch, with a key/value cache. Four runs on the same weights (copied from ours into the
book's model, and checked to give the same tokens) separate the two effects:

1. book: its ``GPTModel`` + ``generate``, one prompt at a time, no cache;
2. ours, one prompt at a time, no cache (``shared.generate.generate(use_cache=False)``): the
   same algorithm on our model, so 1 -> 2 is the model alone;
3. ours, one prompt at a time, KV cache: 2 -> 3 is the cache's share;
4. ours, all prompts in one left-padded batch, KV cache: 3 -> 4 is batching's share.

A GPT-2-small-shaped model with random weights (the speed does not depend on the values),
the first ``--prompts`` formatted test prompts of the instruction data (default 8), ``--new-tokens``
new tokens each (default 64), greedy, and no end-of-text stop, so every row runs the full
length. Each run is timed once per round after a warm-up (the two runs without a cache answer
only the first ``--slow-prompts`` prompts, and their time is scaled to all prompts), the runs
interleaved (their order rotating from round to round), and the median over rounds reported.

Run from the repository root: ``python benchmarks/generate_responses.py`` (``--threads 1`` on
a busy machine; ``--prompts 4 --new-tokens 32`` for the smaller case). Writes
benchmarks/results/generate_responses.json, or the file given with ``--out``. ``LLMS_QUICK=1``
shrinks everything to a smoke test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, describe, environment, gpt2_small_or_toy, load_ours_into_book, write_report

from shared.data import load_instruction_data
from shared.generate import generate
from shared.instruction import format_prompt, generate_batch_ids, split_entries
from shared.model import GPTModel
from shared.tokenizer import get_gpt2_tokenizer
from shared.utils import by_mode

RESULTS = RESULTS_DIR / "generate_responses.json"

CFG = gpt2_small_or_toy()
NUM_PROMPTS = by_mode(full=8, quick=3)
# The runs without a cache are slow (minutes per prompt on a busy 2-core CPU): they answer only
# the first SLOW_PROMPTS prompts, and their time for all NUM_PROMPTS is that time x NUM_PROMPTS /
# SLOW_PROMPTS (one prompt at a time, the cost adds up prompt by prompt).
SLOW_PROMPTS = by_mode(full=2, quick=3)
NEW_TOKENS = by_mode(full=64, quick=4)
ROUNDS = by_mode(full=3, quick=1)


def book_model_from_ours(ours: GPTModel):
    """The book's ch04 GPTModel with our weights, in eval mode."""
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    cfg = {
        key: ours.cfg[key]
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    }
    return load_ours_into_book(BookGPTModel(cfg), ours.state_dict()).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file to write (default {RESULTS})")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (default {ROUNDS})")
    parser.add_argument(
        "--slow-prompts",
        type=int,
        default=SLOW_PROMPTS,
        help=f"prompts the runs without a cache answer, scaled to all (default {SLOW_PROMPTS})",
    )
    parser.add_argument(
        "--prompts", type=int, default=NUM_PROMPTS, help=f"test prompts to answer (default {NUM_PROMPTS})"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=NEW_TOKENS, help=f"new tokens per prompt (default {NEW_TOKENS})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 on a crowded machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = environment()
    print(describe(record))

    tokenizer = get_gpt2_tokenizer()
    _, test, _ = split_entries(load_instruction_data())
    if args.prompts < 1 or args.new_tokens < 1:
        parser.error("--prompts and --new-tokens must be at least 1.")
    new_tokens = args.new_tokens
    prompts = [tokenizer.encode(format_prompt(entry)) for entry in test[: args.prompts]]
    lengths = [len(ids) for ids in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {new_tokens} new tokens each")

    torch.manual_seed(0)
    ours = GPTModel(CFG).eval()
    try:
        from llms_from_scratch.ch05 import generate as book_generate

        book = book_model_from_ours(ours)
    except ImportError:
        print(
            "llms-from-scratch is not installed (pip install --no-deps llms-from-scratch): skipping the book"
        )
        book = None
    context = CFG["context_length"]

    slow = min(args.slow_prompts, len(prompts))

    def run_book():
        return [
            book_generate(book, torch.tensor([ids]), new_tokens, context)[0, len(ids) :].tolist()
            for ids in prompts[:slow]
        ]

    def run_ours_one_at_a_time(use_cache):
        return [
            generate(ours, torch.tensor([ids]), new_tokens, use_cache=use_cache)[0, len(ids) :].tolist()
            for ids in (prompts if use_cache else prompts[:slow])
        ]

    runs = {
        "ours, one at a time, no cache": lambda: run_ours_one_at_a_time(False),
        "ours, one at a time, KV cache": lambda: run_ours_one_at_a_time(True),
        "ours, batched (left padding), KV cache": lambda: generate_batch_ids(
            ours, prompts, new_tokens, eos_id=None
        ),
    }
    if book is not None:
        runs = {"book: GPTModel + generate, one at a time, no cache": run_book, **runs}

    times = {name: [] for name in runs}
    outputs = {}
    with torch.no_grad():
        # Warm-up: first calls allocate memory and pick kernels; keep that out of the timings.
        generate(ours, torch.tensor([prompts[0]]), 2, use_cache=False)
        generate_batch_ids(ours, prompts, 2, eos_id=None)
        if book is not None:
            book(torch.tensor([prompts[0]]))
        for round_index in range(args.rounds):
            names = list(runs)
            shift = round_index % len(names)  # rotate the order so no run always goes first
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                outputs[name] = runs[name]()
                times[name].append(time.perf_counter() - start)
                print(f"  round {round_index + 1}: {name}: {times[name][-1]:.2f} s")
    reference = outputs["ours, batched (left padding), KV cache"]
    same_tokens = {name: out == reference[: len(out)] for name, out in outputs.items()}
    answered = {name: len(out) for name, out in outputs.items()}
    # Seconds for all prompts: the slow runs' time scaled from the prompts they answered.
    times = {name: [t * len(prompts) / answered[name] for t in values] for name, values in times.items()}
    print(f"same tokens as the batched run: {same_tokens}")

    medians = {name: statistics.median(values) for name, values in times.items()}
    slowest = medians.get("book: GPTModel + generate, one at a time, no cache")
    tokens = new_tokens * len(prompts)
    rows = []
    for name, seconds in medians.items():
        rows.append(
            {
                "run": name,
                "seconds": seconds,
                "new_tokens_per_s": tokens / seconds,
                "speedup_vs_book": slowest / seconds if slowest else None,
                "rounds": times[name],
                "prompts_timed": answered[name],
                "same_tokens": same_tokens[name],
            }
        )
    no_cache = medians["ours, one at a time, no cache"]
    cached = medians["ours, one at a time, KV cache"]
    batched = medians["ours, batched (left padding), KV cache"]
    shares = {
        "model (book GPTModel -> ours, both no cache)": slowest / no_cache if slowest else None,
        "KV cache (one at a time)": no_cache / cached,
        "batching (with the cache)": cached / batched,
        "total vs book": slowest / batched if slowest else None,
    }

    print(
        f"\n{len(prompts)} prompts, {new_tokens} new tokens each, float32, CPU ({torch.get_num_threads()} threads)"
    )
    print("| run | prompts timed | seconds for all | new tokens/s | speed-up vs book |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        speedup = "-" if row["speedup_vs_book"] is None else f"{row['speedup_vs_book']:.1f}x"
        print(
            f"| {row['run']} | {row['prompts_timed']} | {row['seconds']:.2f} | "
            f"{row['new_tokens_per_s']:.1f} | {speedup} |"
        )
    print("\nshares: " + ", ".join(f"{k}: {'-' if v is None else f'{v:.1f}x'}" for k, v in shares.items()))

    result = {
        "config": CFG,
        "num_prompts": len(prompts),
        "prompt_tokens": lengths,
        "new_tokens": new_tokens,
        "slow_prompts": slow,
        "rounds": args.rounds,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": rows,
        "shares": shares,
    }
    write_report(args.out, "generate_responses", record, result)


if __name__ == "__main__":
    main()
