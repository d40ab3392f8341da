"""Tokenizer speed: our BPETokenizer with GPT-2's merges against tiktoken, and BPE training time.

    python benchmarks/tokenizer.py [--out benchmarks/results/tokenizer.json]

- Encoding: The Verdict repeated to about 5 MB (quick mode: about 200 kB), encoded by
  tiktoken's GPT-2 encoding and by ``BPETokenizer.from_gpt2_files``; throughput in MB/s of
  UTF-8 input and the ratio. Both must give the same ids. The text repeats, so after the
  warm-up every pre-token is in our tokenizer's cache: this measures the pre-tokenising
  regex plus cache look-ups, the steady state on ordinary prose.
- Training: ``BPETokenizer().train`` on The Verdict for vocabulary sizes 512, 1,000 and 4,096.
  The story has only about 2,800 ways to merge before every pre-token is one token, so the
  4,096 run stops early; the table shows the size reached.

Timings are the median of interleaved rounds after a warm-up (this machine's speed drifts).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path

from shared import data
from shared.bpe import BPETokenizer
from shared.tokenizer import get_gpt2_tokenizer
from shared.utils import by_mode

TRAIN_VOCAB_SIZES = (512, 1000, 4096)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tokenizer.json"


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def load_tiktoken():
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        print("tiktoken is not installed: skipping the tiktoken column (pip install tiktoken)")
        return None
    return get_gpt2_tokenizer()


def bench_encode(text: str, rounds: int) -> dict:
    megabytes = len(text.encode("utf-8")) / 1e6
    ours = BPETokenizer.from_gpt2_files()
    peer = load_tiktoken()

    our_ids = ours.encode(text)  # warm-up (also fills the pre-token cache)
    peer_ids = peer.encode(text) if peer else None
    our_times, peer_times = [], []
    for _ in range(rounds):  # interleaved, so drift hits both alike
        if peer:
            peer_times.append(timed(peer.encode, text)[0])
        our_times.append(timed(ours.encode, text)[0])

    result = {
        "text_megabytes": round(megabytes, 3),
        "tokens": len(our_ids),
        "rounds": rounds,
        "ours_seconds": statistics.median(our_times),
        "ours_mb_per_s": megabytes / statistics.median(our_times),
    }
    if peer:
        result["tiktoken_seconds"] = statistics.median(peer_times)
        result["tiktoken_mb_per_s"] = megabytes / statistics.median(peer_times)
        result["tiktoken_over_ours"] = result["tiktoken_mb_per_s"] / result["ours_mb_per_s"]
        result["ids_match"] = our_ids == peer_ids
    return result


def bench_train(text: str, rounds: int) -> list[dict]:
    BPETokenizer().train(text, 300)  # warm-up
    times = {size: [] for size in TRAIN_VOCAB_SIZES}
    reached = {}
    for _ in range(rounds):
        for size in TRAIN_VOCAB_SIZES:
            seconds, tokenizer = timed(BPETokenizer().train, text, size, allowed_special={"<|endoftext|>"})
            times[size].append(seconds)
            reached[size] = tokenizer.vocab_size
    return [
        {"vocab_size": size, "reached": reached[size], "seconds": statistics.median(times[size])}
        for size in TRAIN_VOCAB_SIZES
    ]


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    args = parser.parse_args()

    verdict = data.load_the_verdict()
    target_bytes = by_mode(full=5_000_000, quick=200_000)
    text = verdict * max(1, round(target_bytes / len(verdict.encode("utf-8"))))
    rounds = by_mode(full=5, quick=1)

    encode = bench_encode(text, rounds)
    train = bench_train(verdict, by_mode(full=5, quick=1))

    print(
        f"\nEncoding {encode['text_megabytes']:.1f} MB ({encode['tokens']:,} tokens), median of {rounds} rounds:\n"
    )
    print("| tokenizer | MB/s | seconds | ratio to ours |")
    print("| --- | ---: | ---: | ---: |")
    if "tiktoken_mb_per_s" in encode:
        print(
            f"| tiktoken (Rust) | {encode['tiktoken_mb_per_s']:.2f} | {encode['tiktoken_seconds']:.3f} "
            f"| {encode['tiktoken_over_ours']:.2f}x |"
        )
    print(f"| BPETokenizer (Python) | {encode['ours_mb_per_s']:.2f} | {encode['ours_seconds']:.3f} | 1.00x |")
    if "ids_match" in encode:
        print(f"\nSame ids as tiktoken: {encode['ids_match']}")

    print(f"\nTraining on The Verdict ({len(verdict):,} characters):\n")
    print("| vocab_size asked | reached | seconds |")
    print("| ---: | ---: | ---: |")
    for row in train:
        print(f"| {row['vocab_size']:,} | {row['reached']:,} | {row['seconds']:.3f} |")

    result = {
        "benchmark": "tokenizer",
        "mode": by_mode(full="full", quick="quick"),
        "python": platform.python_version(),
        "tiktoken": _version_of("tiktoken"),
        "regex": _version_of("regex"),
        "machine": platform.machine(),
        "encode": encode,
        "train": train,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
