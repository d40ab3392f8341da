"""Benchmark: ch05/pretrain.py's memory and speed as the corpus grows, against the book's approach.

Generates a corpus (shuffled sentences of The Verdict plus sentences drawn from its words,
split into 256 KB documents; no downloads) at 1x, 4x and 16x a base size, then measures:

1. preparation: throughput (MB/s, hashing included) and peak resident memory of
   ``shared.corpus.prepare_corpus``, in a fresh child process per size;
2. training: peak resident memory of ``ch05/pretrain.py`` (quick preset, a fixed number of
   steps) on each prepared corpus, in a child process;
3. the book's approach on the same text: read every file, tokenise the whole text and build
   ``create_dataloader_v1``'s dataset of windows (``llms_from_scratch.ch02``), in a child process;
4. training speed: tokens/s of pretrain.py's step (``shared.train.train_step``: memory-mapped windows, AdamW
   fused, gradient clipping, schedule) against the book's ``train_model_simple`` loop body
   (``zero_grad``, its ``calc_loss_batch``, ``backward``, ``AdamW.step``) with the book's
   GPTModel, on the same windows, same model size and batch, in interleaved rounds;
5. 2-process DDP on the CPU against one process (both with one thread per process, as torchrun
   sets by default), the same per-process batch.

Peak memory is the kernel's high-water mark of resident memory (VmHWM), which includes the
~300 MB that importing torch costs; a row "imports only" shows that floor.

Each pretrain.py run goes through :func:`measure_run` (``python benchmarks/pretrain.py
--measure-run <pretrain.py arguments>``, plainly or under torchrun): it runs the script's
``main`` and writes, per process, the sha256 of the model's parameters (equal digests: DDP kept
every copy bit-identical) and the peak resident memory beside the run's ``summary.json``.

Run from the repository root: ``python benchmarks/pretrain.py`` (``--quick`` for small sizes,
``--out-dir`` for where the results go). Writes pretrain.json and pretrain_memory.png into a new
run folder under benchmarks/runs/ unless ``--refresh-committed`` asks to replace the committed
benchmarks/results/ files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import describe, environment, parse_run_args, summary, time_interleaved, write_report

from shared.checkpoint import TrainHistory
from shared.corpus import WindowSampler, prepare_corpus
from shared.data import load_the_verdict
from shared.distributed import launch_torchrun
from shared.model import GPTModel
from shared.tokenizer import GPT2_VOCAB_SIZE, get_gpt2_tokenizer
from shared.train import TrainSettings, WarmupCosine, make_optimizer, train_step
from shared.utils import by_mode

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "ch05" / "pretrain.py"
BASE_BYTES = by_mode(full=2 * 2**20, quick=64 * 2**10)
SCALES = by_mode(full=(1, 4, 16), quick=(1, 4))
DOCUMENT_BYTES = 256 * 2**10
# The memory runs: a fixed number of quick-preset steps, whatever the corpus size.
TRAIN_ARGS = ["--quick", "--batch-size", "8", "--context-length", "64", "--eval-interval", "10",
              "--eval-batches", "2", "--no-progress"]  # fmt: skip
TRAIN_STEPS = by_mode(full=40, quick=4)
# The speed comparison: a small GPT (GPT-2's vocabulary), the book's model and ours.
SPEED_CFG = by_mode(
    full={"vocab_size": GPT2_VOCAB_SIZE, "context_length": 64, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
          "drop_rate": 0.1, "qkv_bias": False},
    quick={"vocab_size": GPT2_VOCAB_SIZE, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.1, "qkv_bias": False},
)  # fmt: skip
SPEED_BATCH = by_mode(full=4, quick=2)
SPEED_STEPS, SPEED_ROUNDS = by_mode(full=(10, 3), quick=(2, 1))
DDP_STEPS = by_mode(full=20, quick=3)


# ---------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------


def make_corpus(folder: Path, total_bytes: int, seed: int = 0) -> Path:
    """Documents of shuffled Verdict sentences and sentences of random Verdict words."""
    text = load_the_verdict()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    words = re.findall(r"[A-Za-z']+", text)
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < total_bytes:
        parts, size = [], 0
        while size < min(DOCUMENT_BYTES, total_bytes - written):
            if rng.random() < 0.5:
                sentence = rng.choice(sentences)
            else:
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + "."
            parts.append(sentence)
            size += len(sentence) + 1
            if rng.random() < 0.1:
                parts.append("\n")
        document = " ".join(parts)
        (folder / f"doc{index:05d}.txt").write_text(document, encoding="utf-8")
        written += len(document.encode("utf-8"))
        index += 1
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.txt"))


# ---------------------------------------------------------------------------------------
# Child processes (each measurement gets a fresh process, so its peak memory is its own)
# ---------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def child(kind: str, data: str, prepared: str) -> dict:
    tokenizer = get_gpt2_tokenizer()
    started = time.perf_counter()
    if kind == "imports":
        pass
    elif kind == "prepare":
        corpus = prepare_corpus(data, prepared, tokenizer=tokenizer, progress=False)
        assert corpus.reused is False
    elif kind == "book":
        from llms_from_scratch.ch02 import create_dataloader_v1

        texts = [p.read_text(encoding="utf-8") for p in sorted(Path(data).glob("*.txt"))]
        text = "<|endoftext|>".join(texts)
        loader = create_dataloader_v1(text, batch_size=8, max_length=64, stride=64, shuffle=True)
        next(iter(loader))
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def run_child(kind: str, data: Path, prepared: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), LLMS_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--data", str(data), "--prepared", str(prepared)],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain", PRETRAIN)
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    return pretrain


def parameter_digest(model) -> str:
    """sha256 of every parameter's bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def measure_run(argv: list[str]) -> None:
    """pretrain.py's main on ``argv``; then this process's digest and peak memory into ``<out-dir>/rank<R>.json``."""
    pretrain = load_pretrain_script()
    args = pretrain.parse_args(argv)
    result = pretrain.main(argv)
    if result is None:  # --prepare-only
        return
    model, _ = result
    rank = int(os.environ.get("RANK", "0"))
    record = {"parameter_sha256": parameter_digest(model), "peak_rss_mb": peak_rss_mb()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank{rank}.json").write_text(json.dumps(record))


def run_pretrain(args: list[str], torchrun: int = 0, device: str = "cpu") -> dict:
    """pretrain.py in a fresh process (or torchrun with N processes) through :func:`measure_run`.

    Returns its summary.json plus ``rank_parameter_sha256`` and ``peak_rss_mb`` (rank 0's).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as out:
        full = ["--measure-run", *args, "--device", device, "--out-dir", out]
        if torchrun:
            result = launch_torchrun(Path(__file__), full, nproc_per_node=torchrun, timeout=1800, cwd=ROOT, env=env)
        else:
            command = [sys.executable, __file__, *full]  # one process: nothing of its own to leave behind
            result = subprocess.run(command, timeout=1800, cwd=ROOT, env=env, capture_output=True, text=True)
            result.stdout += result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"pretrain.py failed:\n{result.stdout[-3000:]}")
        summary = json.loads((Path(out) / "summary.json").read_text())
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(max(torchrun, 1))]
    summary["rank_parameter_sha256"] = [r["parameter_sha256"] for r in ranks]
    summary["peak_rss_mb"] = ranks[0]["peak_rss_mb"]
    return summary


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def memory_table(work: Path, device: str) -> list[dict]:
    rows = []
    imports = run_child("imports", work, work / "unused")
    print(f"imports only: {imports['peak_rss_mb']:.0f} MB", flush=True)
    for scale in SCALES:
        data = make_corpus(work / f"corpus-{scale}x", BASE_BYTES * scale)
        size = folder_bytes(data)
        prepared = work / f"prepared-{scale}x"
        prepare = run_child("prepare", data, prepared)
        train = run_pretrain(["--data", str(data), "--prepared-dir", str(prepared), "--max-steps", str(TRAIN_STEPS),
                              *TRAIN_ARGS], device=device)  # fmt: skip
        book = run_child("book", data, prepared)
        row = {
            "scale": scale,
            "corpus_mb": size / 2**20,
            "tokens": train["corpus_tokens"],
            "prepare_mb_per_s": size / 2**20 / prepare["seconds"],
            "prepare_peak_rss_mb": prepare["peak_rss_mb"],
            "train_peak_rss_mb": train["peak_rss_mb"],
            "book_seconds": book["seconds"],
            "book_peak_rss_mb": book["peak_rss_mb"],
            "imports_peak_rss_mb": imports["peak_rss_mb"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def speed_comparison(work: Path, device: str) -> dict:
    """pretrain.py's step (``train_step``) vs the book's loop body, same windows, interleaved rounds."""
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    from llms_from_scratch.ch05 import calc_loss_batch as book_calc_loss_batch

    pretrain = load_pretrain_script()

    corpus = prepare_corpus(work / "corpus-1x", work / "prepared-1x", progress=False)
    context = SPEED_CFG["context_length"]
    sampler = WindowSampler(corpus, "train", context, SPEED_BATCH, seed=1)

    torch.manual_seed(0)
    device = torch.device(device)
    ours = GPTModel(SPEED_CFG).to(device).train()
    our_optimizer = make_optimizer(ours, lr=4e-4, weight_decay=0.1)
    total = SPEED_STEPS * (SPEED_ROUNDS + 1)  # warm-up round included
    schedule = WarmupCosine(our_optimizer, peak_lr=4e-4, total_steps=total, warmup_steps=2, min_lr=4e-5)
    settings = TrainSettings(grad_clip=1.0, lr_schedule=schedule)
    history = TrainHistory()
    torch.manual_seed(0)
    book = BookGPTModel(SPEED_CFG).to(device).train()
    book_optimizer = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1)  # as in the book

    ours_steps, book_steps = itertools.count(), itertools.count()  # both walk through the same steps

    def setup_ours():
        def step():
            index = next(ours_steps)
            torch.manual_seed(pretrain.step_seed(1, index, 0))
            history.global_step = index
            train_step(ours, our_optimizer, [sampler.batch(index, 0)], history, settings, device)

        return step

    def setup_book():
        # The same windows, read before the clock starts: the book's loop gets them from memory.
        batches = iter([sampler.batch(next(book_steps)) for _ in range(SPEED_STEPS)])

        def step():
            input_batch, target_batch = next(batches)
            book_optimizer.zero_grad()
            loss = book_calc_loss_batch(input_batch, target_batch, book, device)
            loss.backward()
            book_optimizer.step()

        return step

    samples = time_interleaved(
        {"ours": setup_ours, "book": setup_book}, rounds=SPEED_ROUNDS, steps=SPEED_STEPS
    )
    tokens_per_step = SPEED_BATCH * context
    result = {
        "config": SPEED_CFG,
        "batch": SPEED_BATCH,
        "steps_per_sample": SPEED_STEPS,
        "rounds": SPEED_ROUNDS,
        "threads": torch.get_num_threads(),
        "ours": summary(samples["ours"]),
        "book": summary(samples["book"]),
        "ours_tokens_per_s": tokens_per_step / statistics.median(samples["ours"]),
        "book_tokens_per_s": tokens_per_step / statistics.median(samples["book"]),
    }
    result["ratio"] = result["ours_tokens_per_s"] / result["book_tokens_per_s"]
    print(json.dumps(result), flush=True)
    return result


def ddp_comparison(work: Path, device: str) -> dict:
    args = ["--data", str(work / "corpus-1x"), "--prepared-dir", str(work / "prepared-1x"),
            "--max-steps", str(DDP_STEPS), *TRAIN_ARGS]  # fmt: skip
    args[args.index("--eval-interval") + 1] = str(DDP_STEPS)
    # One run each: on a CPU each step takes over a second, so run-to-run noise is small next to it.
    runs = {"single": run_pretrain(args, device=device), "ddp": run_pretrain(args, torchrun=2, device=device)}
    result = {}
    for name, run in runs.items():
        result[name] = {
            "ms_per_step": run["ms_per_step"],
            "tokens_per_s": run["tokens_per_s"],
            "tokens_per_step": run["tokens_per_step"],
            "ranks_identical": len(set(run["rank_parameter_sha256"])) == 1,
        }
    result["step_time_ratio"] = result["ddp"]["ms_per_step"] / result["single"]["ms_per_step"]
    result["throughput_ratio"] = result["ddp"]["tokens_per_s"] / result["single"]["tokens_per_s"]
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["corpus_mb"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(
        sizes, [r["book_peak_rss_mb"] for r in rows], "o-", label="book: read + tokenise + windows in memory"
    )
    ax.plot(sizes, [r["prepare_peak_rss_mb"] for r in rows], "s-", label="pretrain.py: prepare (streamed)")
    ax.plot(sizes, [r["train_peak_rss_mb"] for r in rows], "^-", label="pretrain.py: train (memory map)")
    ax.axhline(
        rows[0]["imports_peak_rss_mb"], color="grey", linestyle=":", label="imports only (torch, tiktoken)"
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s:.2g}" for s in sizes])
    ax.set_xlabel("corpus size (MB)")
    ax.set_ylabel("peak resident memory (MB)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [
        "| corpus | tokens | prepare MB/s | prepare peak RSS | train peak RSS | book peak RSS |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["memory"]:
        lines.append(
            f"| {r['scale']}x ({r['corpus_mb']:.1f} MB) | {r['tokens']:,} | {r['prepare_mb_per_s']:.2f} | "
            f"{r['prepare_peak_rss_mb']:.0f} MB | {r['train_peak_rss_mb']:.0f} MB | {r['book_peak_rss_mb']:.0f} MB |"
        )
    speed = report["speed"]
    lines += [
        "",
        f"Training speed: pretrain.py {speed['ours_tokens_per_s']:,.0f} tokens/s, book's loop "
        f"{speed['book_tokens_per_s']:,.0f} tokens/s (ratio {speed['ratio']:.2f}).",
    ]
    ddp = report["ddp"]
    lines.append(
        f"DDP: 1 process {ddp['single']['ms_per_step']:.0f} ms/step, 2 processes {ddp['ddp']['ms_per_step']:.0f} "
        f"ms/step (x{ddp['step_time_ratio']:.2f}); throughput ratio {ddp['throughput_ratio']:.2f}."
    )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--measure-run"]:  # one pretrain.py run (see measure_run)
        measure_run(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    if "--child" in sys.argv[1:]:  # one measurement (see child); writes nothing itself
        args = parser.parse_args()
        print(json.dumps(child(args.child, args.data, args.prepared)))
        return
    args = parse_run_args("pretrain", "", None, parser)

    torch.set_num_threads(1)  # a shared 2-core machine: one thread per process gives steadier numbers
    record = environment()
    print(describe(record), flush=True)
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as work:
        work = Path(work)
        report = {
            "memory": memory_table(work, args.device),
            "speed": speed_comparison(work, args.device),
            "ddp": ddp_comparison(work, args.device),
        }
    write_report(args.out, "pretrain", record, report)
    plot(report["memory"], args.out.with_name("pretrain_memory.png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
