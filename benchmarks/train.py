"""Benchmark: the ch05 training run through ``shared.train`` vs the book's reference code, on CPU.

Both sides train GPT-2 small (162M parameters with an untied head at context 256, dropout 0.1, no
query/key/value bias: the book's ch05 config) on The Verdict (90/10 split, windows of 256 with
stride 256, batch 2), evaluating every 5 steps on 5 batches and printing a 50-token sample after
each epoch, exactly as the book's ch05 run does:

- **ours**: ``shared.model.GPTModel`` + ``shared.train.make_optimizer`` (AdamW, fused where the
  device has it, decay on matrices only) + ``shared.train.train_model``;
- **book**: ``llms_from_scratch.ch04.GPTModel`` + ``torch.optim.AdamW(lr=4e-4, weight_decay=0.1)``
  + ``llms_from_scratch.ch05.train_model_simple`` (PyPI package ``llms-from-scratch``).

Both models start from the same weights (ours copied into the book's: our fused ``qkv`` matrix is
split into its ``W_query``/``W_key``/``W_value``). Before timing, a correctness check runs the first
optimizer steps of both with dropout off and compares the losses.

Two more columns of ours, same loop: ``ours_bf16`` runs the forward passes under bfloat16 autocast
(``train_model(..., settings=TrainSettings(autocast_dtype=torch.bfloat16))``: bfloat16 matrix products, float32 weights,
gradients and optimizer state), and with ``--compile`` ``ours_bf16_compile`` adds
``torch.compile`` (worth it on a GPU; on a small CPU the compilation takes minutes). Their first
losses are compared with the book's float32 ones too, to bfloat16's precision.

Timing: one round = one epoch (9 optimizer steps, 2 evaluations, 1 sample) per side, each from
the same initial weights and data order, sides interleaved and their order alternated,
after one untimed warm-up epoch per side; the figure is the median over rounds of
tokens trained per second of wall time (evaluation and sampling included, as a learner experiences
them), and the headline ratio is the median of the per-round ratios (ours / book).
``LLMS_QUICK=1`` shrinks the model, the context and the text to a smoke test.

Run from the repository root: ``python benchmarks/train.py`` (``--quick`` for a smoke run). Writes
train.json into a new folder under benchmarks/runs/ (``--out-dir`` to choose one;
``--refresh-committed`` replaces benchmarks/results/train.json, or train_cuda.json with
``--device cuda``; add ``--compile`` for the GPU table).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, load_ours_into_book, parse_run_args  # benchmarks/common.py

from shared.data import load_the_verdict
from shared.dataloader import train_val_loaders
from shared.model import GPT_CONFIGS, GPTModel, count_parameters
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import TrainSettings, autocast, calc_loss_batch, make_optimizer, train_model
from shared.utils import by_mode, get_device, is_quick

# The book's GPT_CONFIG_124M for chapter 5, or a toy in quick mode (same data and loaders).
CFG = by_mode(
    full={**GPT_CONFIGS["gpt2-small"], "context_length": 256},
    quick={**GPT_CONFIGS["gpt2-small"], "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1},
)
TEXT_CHARS = by_mode(full=None, quick=3000)  # quick mode: the story's first 3,000 characters
ROUNDS = by_mode(full=3, quick=1)
CHECK_STEPS = 3  # optimizer steps compared loss by loss before timing
LR, WEIGHT_DECAY = 4e-4, 0.1
EVAL_FREQ, EVAL_ITER = 5, 5
START_CONTEXT = "Every effort moves you"


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------


def make_loaders():
    return train_val_loaders(load_the_verdict()[:TEXT_CHARS], CFG["context_length"])


_WEIGHTS_DIR = tempfile.TemporaryDirectory(prefix="bench-train-")


def initial_weights(cfg: dict) -> dict:
    """Our model's initial weights (seeded); every run of either side starts from these.

    They go through a file that is memory-mapped back, so they sit in the page cache instead of
    adding a third copy of GPT-2 small to the process's own memory.
    """
    torch.manual_seed(123)
    path = Path(_WEIGHTS_DIR.name) / f"initial-{len(os.listdir(_WEIGHTS_DIR.name))}.pt"
    torch.save(GPTModel(cfg).state_dict(), path)
    return torch.load(path, mmap=True, weights_only=True)


def build(side: str, cfg: dict, weights: dict) -> torch.nn.Module:
    """A fresh model of one side with the given (our-layout) weights."""
    ours = GPTModel(cfg)
    ours.load_state_dict(weights)
    if side == "ours":
        return ours
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    return load_ours_into_book(BookGPTModel(cfg), ours.state_dict())


# ---------------------------------------------------------------------------------------
# Correctness: the same first losses from the same weights
# ---------------------------------------------------------------------------------------


def first_losses(model, optimizer, batches, device, autocast_dtype=None) -> list[float]:
    losses = []
    model.train()
    for inputs, targets in batches:
        optimizer.zero_grad()
        with autocast(device, autocast_dtype):
            loss = calc_loss_batch(inputs, targets, model, device)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def check_same_losses(train_loader, device) -> dict:
    """Dropout off (its random masks are drawn differently), same weights, same batches.

    One model at a time, so that memory holds a single GPT-2 small with its optimizer state.
    """
    cfg = {**CFG, "drop_rate": 0.0}
    batches = [batch for _, batch in zip(range(CHECK_STEPS), train_loader, strict=False)]
    weights = initial_weights(cfg)

    def losses(side, make_opt, autocast_dtype=None):
        model = build(side, cfg, weights).to(device)
        return first_losses(model, make_opt(model), batches, device, autocast_dtype)

    def book_adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    book_losses = losses("book", book_adamw)
    # Ours with the book's optimizer: the model alone must give the book's losses ...
    plain_losses = losses("ours", book_adamw)
    # ... and with make_optimizer (fused, no decay on biases/norms/embeddings) nearly so.
    shared_losses = losses("ours", lambda model: make_optimizer(model, LR, WEIGHT_DECAY))
    # ... and under bfloat16 autocast, to bfloat16's precision (about 3 significant digits).
    bf16_losses = losses("ours", lambda model: make_optimizer(model, LR, WEIGHT_DECAY), torch.bfloat16)
    diff_plain = max(abs(a - b) for a, b in zip(plain_losses, book_losses, strict=True))
    diff_shared = max(abs(a - b) for a, b in zip(shared_losses, book_losses, strict=True))
    diff_bf16 = max(abs(a - b) for a, b in zip(bf16_losses, book_losses, strict=True))
    return {
        "steps": CHECK_STEPS,
        "book": book_losses,
        "ours_with_book_adamw": plain_losses,
        "ours_with_make_optimizer": shared_losses,
        "ours_bf16_autocast": bf16_losses,
        "max_abs_diff_same_optimizer": diff_plain,
        "max_abs_diff_make_optimizer": diff_shared,
        "max_abs_diff_bf16_autocast": diff_bf16,
        "same_within_1e-4": diff_plain < 1e-4 and diff_shared < 1e-4,
        "bf16_within_0.05": diff_bf16 < 0.05,
    }


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(model, optimizer, train_loader, val_loader, tokenizer, device, autocast_dtype=None):
    _synchronize(device)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the sample after the epoch, as for the book
        history = train_model(
            model, train_loader, val_loader, optimizer, device, 1, EVAL_FREQ, EVAL_ITER,
            start_context=START_CONTEXT, tokenizer=tokenizer, progress=False, settings=TrainSettings(autocast_dtype=autocast_dtype),
        )  # fmt: skip
    _synchronize(device)
    return time.perf_counter() - started, history.val_losses[-1]


def run_book(model, optimizer, train_loader, val_loader, tokenizer, device):
    from llms_from_scratch.ch05 import train_model_simple

    _synchronize(device)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every evaluation and a sample
        _, val_losses, _ = train_model_simple(
            model, train_loader, val_loader, optimizer, device, 1, EVAL_FREQ, EVAL_ITER,
            start_context=START_CONTEXT, tokenizer=tokenizer,
        )  # fmt: skip
    _synchronize(device)
    return time.perf_counter() - started, val_losses[-1]


def epoch_tokens(train_loader) -> int:
    return sum(inputs.numel() for inputs, _ in train_loader)


def make_sides(compile_model: bool) -> dict:
    """name -> (model side, optimizer factory, run function, autocast dtype, compile?)."""

    def ours_adamw(model):
        return make_optimizer(model, LR, WEIGHT_DECAY)

    def book_adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    sides = {
        "ours": ("ours", ours_adamw, run_ours, None, False),
        "ours_bf16": ("ours", ours_adamw, run_ours, torch.bfloat16, False),
    }
    if compile_model:
        sides["ours_bf16_compile"] = ("ours", ours_adamw, run_ours, torch.bfloat16, True)
    sides["book"] = ("book", book_adamw, run_book, None, False)
    return sides


def time_rounds(train_loader, val_loader, tokenizer, device, compile_model=False, report=None) -> dict:
    weights = initial_weights(CFG)
    sides = make_sides(compile_model)
    tokens = epoch_tokens(train_loader)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    val_losses: dict[str, list[float]] = {name: [] for name in sides}
    warm_up_seconds: dict[str, float] = {}
    params = {}

    def one_epoch(name):
        side, make_opt, run, autocast_dtype, compiled = sides[name]
        model = build(side, CFG, weights).to(device)
        params[name] = count_parameters(model)
        optimizer = make_opt(model)
        if compiled:
            model = torch.compile(model)
        extra = {} if side == "book" else {"autocast_dtype": autocast_dtype}
        return run(model, optimizer, train_loader, val_loader, tokenizer, device, **extra)

    # One untimed epoch per side first: the correctness check ran float32 only, and bfloat16
    # kernels, a GPU's libraries and torch.compile's compilation all pay a first-call cost.
    for name in sides:
        torch.manual_seed(999)
        warm_up_seconds[name], _ = one_epoch(name)
        print(f"warm-up: {name} {warm_up_seconds[name]:.1f} s", flush=True)

    # Each run trains one epoch from the same initial weights with the same shuffle, so every
    # side does the same work. The clock starts inside run(), after the model is built, and the
    # model is freed after each run, so one GPT-2 small with its optimizer state is in memory
    # at a time. Sides take turns, and the order is reversed every other round.
    for round_index in range(1, ROUNDS + 1):
        order = list(sides) if round_index % 2 == 1 else list(reversed(sides))
        for name in order:
            torch.manual_seed(1000 + round_index)  # the same shuffle and dropout seed for every side
            elapsed, val_loss = one_epoch(name)
            print(f"round {round_index}: {name} {elapsed:.1f} s ({tokens / elapsed:.0f} tokens/s)", flush=True)
            seconds[name].append(elapsed)
            rates[name].append(tokens / elapsed)
            val_losses[name].append(val_loss)
            if report is not None:  # keep what is measured so far, in case the run is cut short
                report({"seconds": seconds, "tokens_per_s_rounds": rates, "val_loss_after_epoch": val_losses})
    return {
        "tokens_per_epoch": tokens,
        "params": params,
        "warm_up_seconds": warm_up_seconds,
        "val_loss_after_epoch": val_losses,
        "seconds": seconds,
        "tokens_per_s_rounds": rates,
        "tokens_per_s": {name: statistics.median(values) for name, values in rates.items()},
        # Per-round ratios against the book: a round's runs follow each other, so load drift
        # between rounds cancels out.
        "round_ratios": {
            name: [a / b for a, b in zip(rates[name], rates["book"], strict=True)]
            for name in sides
            if name != "book"
        },
    }


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


LABELS = {
    "ours": "ours: `train_model` + `make_optimizer`, float32",
    "ours_bf16": "ours, bfloat16 autocast (`TrainSettings(autocast_dtype=torch.bfloat16)`)",
    "ours_bf16_compile": "ours, bfloat16 autocast + `torch.compile`",
    "book": "book: `train_model_simple` + `AdamW`, float32",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile column")
    device = get_device(parser.parse_known_args(argv)[0].device)
    args = parse_run_args("train" if device.type == "cpu" else f"train_{device.type}", "", argv, parser)
    out_path = args.out
    try:
        import llms_from_scratch.ch05  # noqa: F401
    except ImportError:
        sys.exit("needs the book's reference code: pip install --no-deps llms-from-scratch")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, quick={is_quick()}",
          flush=True)  # fmt: skip
    tokenizer = get_gpt2_tokenizer()
    train_loader, val_loader = make_loaders()

    result = {
        "benchmark": "train",
        "environment": environment(device),
        "quick": is_quick(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "torch": torch.__version__,
        "config": CFG,
        "batch": [2, CFG["context_length"]],
        "eval": {"eval_freq": EVAL_FREQ, "eval_iter": EVAL_ITER},
        "rounds": ROUNDS,
        "complete": False,
    }
    check = check_same_losses(train_loader, device)
    result["check"] = check
    write_json(out_path, result)
    print(
        f"first {CHECK_STEPS} losses, dropout off: book {[round(x, 5) for x in check['book']]}, "
        f"ours (book's AdamW) {[round(x, 5) for x in check['ours_with_book_adamw']]}, "
        f"ours (make_optimizer) {[round(x, 5) for x in check['ours_with_make_optimizer']]}, "
        f"ours bf16 {[round(x, 5) for x in check['ours_bf16_autocast']]}; max |diff| "
        f"{check['max_abs_diff_same_optimizer']:.1e} / {check['max_abs_diff_make_optimizer']:.1e} / "
        f"{check['max_abs_diff_bf16_autocast']:.1e}",
        flush=True,
    )

    def report(partial):
        write_json(out_path, {**result, "timing_so_far": partial})

    timing = time_rounds(train_loader, val_loader, tokenizer, device, args.compile, report)
    # Headline: the median of the per-round ratios (ours / book).
    speedups = {name: statistics.median(ratios) for name, ratios in timing["round_ratios"].items()}
    print(f"\n| training loop ({device}) | tokens/s (median) | vs book (median of rounds) |")
    print("|---|---:|---:|")
    for name, rate in timing["tokens_per_s"].items():
        ratio = f"{speedups[name]:.2f}x" if name in speedups else "1.00x"
        print(f"| {LABELS[name]} | {rate:.0f} | {ratio} |")
    for name, ratios in timing["round_ratios"].items():
        print(f"per-round ratios, {name}: {[round(r, 2) for r in ratios]}")
    result |= {
        "timing": timing,
        "speedup": speedups["ours"],
        "speedups": speedups,
        "complete": True,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    write_json(out_path, result)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
