"""Tokenizer speed: our BPETokenizer with GPT-2's merges against tiktoken, and BPE training time.

    python benchmarks/tokenizer.py [--out benchmarks/results/tokenizer.json]

- Encoding: The Verdict repeated to about 5 MB (quick mode: about 200 kB), encoded by
  tiktoken's GPT-2 encoding and by ``BPETokenizer.from_gpt2_files``; throughput in MB/s of
  UTF-8 input and the ratio. Both must give the same ids. The text repeats, so after the
  warm-up every pre-token is in our tokenizer's cache: this measures the pre-tokenising
  regex plus cache look-ups, the steady state on ordinary prose.
- Training: ``BPETokenizer().train`` on The Verdict for vocabulary sizes 512, 1,000 and 4,096.
  The story allows only 2,517 merges before every pre-token is one token, so the 4,096 run
  stops early at 2,774 ids (256 bytes, 2,517 merges, ``<|endoftext|>``); the table shows the
  size reached.

Timings are the median of interleaved rounds after a warm-up (see benchmarks/common.py).
"""

from __future__ import annotations

from common import describe, environment, parse_args, ready, summary, time_interleaved, write_report

from shared import data
from shared.bpe import BPETokenizer
from shared.tokenizer import get_gpt2_tokenizer
from shared.utils import by_mode

TRAIN_VOCAB_SIZES = (512, 1000, 4096)


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
    our_ids = ours.encode(text)
    candidates = {"ours": ready(lambda: ours.encode(text))}
    if peer:
        candidates["tiktoken"] = ready(lambda: peer.encode(text))
    times = time_interleaved(candidates, rounds)  # the warm-up round also fills our pre-token cache
    result = {"text_megabytes": round(megabytes, 3), "tokens": len(our_ids), "rounds": rounds}
    for name, samples in times.items():
        stats = summary(samples)
        result[name] = {**stats, "mb_per_s": megabytes / stats["median_s"]}
    if peer:
        result["tiktoken_over_ours"] = result["tiktoken"]["mb_per_s"] / result["ours"]["mb_per_s"]
        result["ids_match"] = our_ids == peer.encode(text)
    return result


def bench_train(text: str, rounds: int) -> list[dict]:
    reached = {}

    def trainer(size):
        def train():
            reached[size] = BPETokenizer().train(text, size, allowed_special={"<|endoftext|>"}).vocab_size

        return ready(train)

    times = time_interleaved({size: trainer(size) for size in TRAIN_VOCAB_SIZES}, rounds)
    return [
        {"vocab_size": size, "reached": reached[size], **summary(times[size])} for size in TRAIN_VOCAB_SIZES
    ]


def main(argv=None) -> None:
    args = parse_args("tokenizer", __doc__.splitlines()[0], argv)
    record = environment()
    print(describe(record))

    verdict = data.load_the_verdict()
    target_bytes = by_mode(full=5_000_000, quick=200_000)
    text = verdict * max(1, round(target_bytes / len(verdict.encode("utf-8"))))
    rounds = by_mode(full=5, quick=1)

    encode = bench_encode(text, rounds)
    train = bench_train(verdict, rounds)

    print(
        f"\nEncoding {encode['text_megabytes']:.1f} MB ({encode['tokens']:,} tokens), median of {rounds} rounds:\n"
    )
    print("| tokenizer | MB/s | seconds | ratio to ours |")
    print("| --- | ---: | ---: | ---: |")
    if "tiktoken" in encode:
        print(
            f"| tiktoken (Rust) | {encode['tiktoken']['mb_per_s']:.2f} | {encode['tiktoken']['median_s']:.3f} "
            f"| {encode['tiktoken_over_ours']:.2f}x |"
        )
    print(
        f"| BPETokenizer (Python) | {encode['ours']['mb_per_s']:.2f} | {encode['ours']['median_s']:.3f} | 1.00x |"
    )
    if "ids_match" in encode:
        print(f"\nSame ids as tiktoken: {encode['ids_match']}")

    print(f"\nTraining on The Verdict ({len(verdict):,} characters):\n")
    print("| vocab_size asked | reached | seconds |")
    print("| ---: | ---: | ---: |")
    for row in train:
        print(f"| {row['vocab_size']:,} | {row['reached']:,} | {row['median_s']:.3f} |")

    write_report(args.out, "tokenizer", record, {"encode": encode, "train": train})


if __name__ == "__main__":
    main()
