"""What every benchmark shares: the ``--out`` argument (``--out-dir`` and friends in
:func:`parse_run_args`), the record of the machine it ran on,
interleaved timing, and the JSON report.

Each benchmark is a script (``python benchmarks/<name>.py``); Python puts the script's folder
on the import path, so ``from common import ...`` works from any working directory.

Timing on a shared CPU drifts by 10-30% from minute to minute, so a single measurement cannot
tell a 5% difference from noise. :func:`time_interleaved` therefore runs every candidate once
per round, in turn (drift hits all of them alike), times several steps together in each sample
(a short step's timer and scheduling noise are spread over the whole sample), discards warm-up
rounds, and keeps every sample so the report can show the spread as well as the median.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shared.model import GPT_CONFIGS
from shared.utils import add_output_args, by_mode, get_device, is_quick, run_dir, write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed: replaced only with --refresh-committed
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # a new folder per run by default

if "--quick" in sys.argv[1:]:  # before the benchmark picks its sizes with by_mode (child processes inherit it)
    os.environ["LLMS_QUICK"] = "1"
PEER_PACKAGES = ("torch", "tiktoken", "transformers", "regex", "llms-from-scratch")


def gpt2_small_or_toy(**toy_changes) -> dict:
    """GPT-2 small with query/key/value biases (Hugging Face's GPT-2 always has them) and no
    dropout; in quick mode a 2-layer, 64-wide toy of it, with ``toy_changes`` on top."""
    full = {**GPT_CONFIGS["gpt2-small"], "qkv_bias": True, "drop_rate": 0.0}
    return by_mode(full=full, quick={**full, "emb_dim": 64, "n_heads": 4, "n_layers": 2, **toy_changes})


def parse_args(name: str, description: str, argv=None) -> argparse.Namespace:
    """The one argument every benchmark takes: ``--out``, the JSON file to write."""
    default = RESULTS_DIR / f"{name}.json"
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default, help=f"JSON file to write (default {default})")
    return parser.parse_args(argv)


def parse_run_args(name: str, description: str, argv=None, parser=None) -> argparse.Namespace:
    """The flags of a benchmark script: ``--out-dir``, ``--refresh-committed``, ``--quick``, ``--device``.

    Results go to a new folder under benchmarks/runs/ unless ``--out-dir`` names one or
    ``--refresh-committed`` asks to replace the committed files in benchmarks/results/.
    ``args.out`` is the report's path, ``<folder>/<name>.json``. ``parser``: one that already
    holds the script's own flags (a ``--device`` of its own included).
    """
    parser = parser or argparse.ArgumentParser(description=description)
    add_output_args(parser, name, committed=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="small sizes, same code (as LLMS_QUICK=1)")
    if "--device" not in parser._option_string_actions:
        parser.add_argument("--device", default="cpu", help="cpu (default), cuda or mps")
    args = parser.parse_args(argv)
    # A new run folder beside the committed results, unless --out-dir or --refresh-committed.
    folder = run_dir(args.out_dir, RUNS_DIR, name, committed=RESULTS_DIR, refresh=args.refresh_committed)
    args.out = folder / f"{name}.json"
    return args


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, CPU, threads and device: what a reader needs to compare two reports.

    ``device``: the one the benchmark ran on, when it chose one itself (default: ``get_device()``).
    """
    device = torch.device(device) if device is not None else get_device()
    record = {
        "python": platform.python_version(),
        "versions": {package: _version(package) for package in PEER_PACKAGES},
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "quick": is_quick(),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def describe(record: dict) -> str:
    """One line for the console: the facts of :func:`environment` a table needs beside it."""
    mode = "quick" if record["quick"] else "full"
    return (
        f"{record['cpu']} ({record['cpu_count']} CPUs, torch on {record['torch_threads']} threads), "
        f"device {record.get('gpu', record['device'])}, torch {record['versions']['torch']}, {mode} mode"
    )


def load_ours_into_book(book: torch.nn.Module, ours: dict) -> torch.nn.Module:
    """Give the book's ch04 ``GPTModel`` (``llms_from_scratch``) the weights of our state dict ``ours``.

    The layouts differ in three ways: the book's attention has separate ``W_query``/``W_key``/
    ``W_value`` layers where ours stacks them in one ``qkv`` (queries, keys, values in that
    order), its feed-forward is a ``Sequential`` (``layers.0``/``layers.2`` for our ``fc``/
    ``proj``), and its norms call their parameters ``scale``/``shift``. Everything else has the
    same name. Only the book's causal-mask buffers may be left unset; returns ``book``.
    """
    state = {}
    for name, tensor in ours.items():
        if ".att.qkv." in name:
            for part, piece in zip(("W_query", "W_key", "W_value"), tensor.chunk(3, dim=0), strict=True):
                state[name.replace(".att.qkv.", f".att.{part}.")] = piece.clone()
            continue
        name = name.replace(".ff.fc.", ".ff.layers.0.").replace(".ff.proj.", ".ff.layers.2.")
        module, _, kind = name.rpartition(".")
        if module.rpartition(".")[2].startswith(("norm", "final_norm")):
            name = f"{module}.{'scale' if kind == 'weight' else 'shift'}"
        state[name] = tensor.clone()
    missing, unexpected = book.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith("att.mask") for name in missing):
        raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")
    return book


def time_interleaved(
    candidates: dict[str, Callable[[], Callable[[], object]]],
    rounds: int,
    steps: int = 1,
    warmup_rounds: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of every candidate, one sample per round: ``{name: [seconds, ...]}``.

    ``candidates`` maps a name to a *setup* function. Each round, for each candidate in turn,
    the setup runs untimed and returns the step to time (so state such as an optimizer exists
    only while its candidate runs); then ``steps`` calls of it are timed together and divided
    by ``steps``. The first ``warmup_rounds`` rounds are not recorded. ``sync`` (for example
    ``torch.cuda.synchronize``) is called before the clock starts and stops.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be at least 1, got rounds={rounds}, steps={steps}")
    wait = sync or (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup_rounds + rounds):
        for name, setup in candidates.items():
            step = setup()
            wait()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            wait()
            seconds = (time.perf_counter() - start) / steps
            del step
            if round_index >= warmup_rounds:
                samples[name].append(seconds)
    return samples


def ready(function: Callable[[], object]) -> Callable[[], Callable[[], object]]:
    """A setup for :func:`time_interleaved` that needs no preparation: it returns ``function``."""
    return lambda: function


def summary(samples: list[float]) -> dict:
    """Median, fastest and slowest of one candidate's samples (seconds), and the samples."""
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": samples,
    }


def write_report(path: Path, benchmark: str, record: dict, results: dict) -> Path:
    """Write ``{"benchmark", "environment", **results}`` as JSON to ``path`` (atomically)."""
    write_json(path, {"benchmark": benchmark, "environment": record, **results})
    print(f"\nwrote {path}")
    return path
