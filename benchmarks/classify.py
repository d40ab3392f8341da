"""Benchmark: one epoch of spam-classifier finetuning, ours vs the book's ``train_classifier_simple``.

Both sides start from the same weights and see the same examples in the same order:

- the book: ``llms_from_scratch.ch04.GPTModel`` with its head swapped for a 2-way linear layer,
  every message padded to the longest training message (120 tokens) by the book's
  ``SpamDataset``, the logits read at the final position, ``train_classifier_simple`` with
  ``torch.optim.AdamW``;
- ours: ``shared.model.GPTModel`` made a classifier by ``shared.classification.make_classifier``,
  each batch padded to its own longest message, the logits read at the last real token,
  ``shared.train.train_model`` with ``classification_loss`` and ``make_optimizer``.

Both freeze all but the last transformer block, the final norm and the head (the book's
setting), use lr 5e-5, weight decay 0.1, batch 8, dropout 0, evaluate losses every 50 steps on
5 batches and accuracies after the epoch on 5 batches, as the book's notebook does. The timed
part is the training call (evaluations inside it included). Afterwards, untimed, each trained
model is scored on the whole test split with its own padding and reading position.

OpenAI's GPT-2 weights are not available on the machine this ran on, so both models get the
same *randomly initialised* GPT-2-small-shaped weights (copied from ours into the book's
layout; the logits are checked to match before training). The accuracies therefore say only
that the two loops learn alike, not what pretrained GPT-2 reaches.

Rounds are interleaved (book, ours, book, ours, ...) and the median is reported, because
this machine's speed drifts from minute to minute. ``LLMS_QUICK=1`` shrinks everything.

Run from the repository root: ``python benchmarks/classify.py``. Writes benchmarks/results/classify.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from common import environment, load_ours_into_book  # benchmarks/common.py

from shared import classification as cls
from shared.model import GPT_CONFIGS, GPTModel
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import TrainSettings, make_optimizer, train_model
from shared.utils import by_mode, is_quick, write_json
from shared.weights import STANDIN_CONFIG

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results" / "classify.json"
BATCH_SIZE, LR, WEIGHT_DECAY, EVAL_FREQ, EVAL_ITER = 8, 5e-5, 0.1, 50, 5
CFG = by_mode(
    full={**GPT_CONFIGS["gpt2-small"], "qkv_bias": True, "drop_rate": 0.0},
    quick={**STANDIN_CONFIG, "n_layers": 2, "emb_dim": 32, "n_heads": 2, "context_length": 1024},
)


# ---------------------------------------------------------------------------------------
# The two models, with the same weights
# ---------------------------------------------------------------------------------------


def make_models(seed: int = 123):
    """(our classifier, the book's classifier) with identical weights and trainable parameters."""
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    torch.manual_seed(seed)
    ours = cls.make_classifier(GPTModel(CFG), trainable_blocks=1)
    book = BookGPTModel(CFG)
    book.out_head = torch.nn.Linear(CFG["emb_dim"], 2)
    load_ours_into_book(book, ours.state_dict())
    # The book's freezing: everything, then the last block, the final norm and the head train again.
    book.requires_grad_(False)
    for module in (book.trf_blocks[-1], book.final_norm, book.out_head):
        module.requires_grad_(True)
    return ours, book


def check_same_function(ours, book, ids: torch.Tensor) -> float:
    """Largest logit difference at the final position (the book's read) on one batch."""
    ours.eval(), book.eval()
    with torch.no_grad():
        diff = (ours(ids)[:, -1] - book(ids)[:, -1]).abs().max().item()
    assert diff < 1e-3, f"the two models disagree by {diff}: the weight copy is wrong"
    return diff


# ---------------------------------------------------------------------------------------
# One round of each
# ---------------------------------------------------------------------------------------


def run_book(book_init, csvs, seed, score_test=True):
    from llms_from_scratch.ch06 import SpamDataset as BookSpamDataset
    from llms_from_scratch.ch06 import calc_accuracy_loader, train_classifier_simple
    from torch.utils.data import DataLoader

    tokenizer = get_gpt2_tokenizer()
    # The book pads to the longest message of the whole training split (120 tokens), also when
    # this benchmark trains on a subset of it.
    full_train_longest = BookSpamDataset(csvs["full_train"], tokenizer, max_length=None).max_length
    train_set = BookSpamDataset(csvs["train"], tokenizer, max_length=full_train_longest)
    val_set = BookSpamDataset(csvs["validation"], tokenizer, max_length=train_set.max_length)
    test_set = BookSpamDataset(csvs["test"], tokenizer, max_length=train_set.max_length)
    model = copy.deepcopy(book_init)
    torch.manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    started = time.perf_counter()
    train_classifier_simple(model, train_loader, val_loader, optimizer, "cpu", 1, EVAL_FREQ, EVAL_ITER)
    seconds = time.perf_counter() - started
    test_acc = (
        calc_accuracy_loader(DataLoader(test_set, batch_size=BATCH_SIZE), model, "cpu")
        if score_test
        else None
    )
    tokens = len(train_loader) * BATCH_SIZE * train_set.max_length
    return {
        "seconds": seconds,
        "test_acc": test_acc,
        "padded_length": train_set.max_length,
        "train_tokens": tokens,
    }


def run_ours(ours_init, csvs, seed, score_test=True):
    tokenizer = get_gpt2_tokenizer()
    data = {
        name: cls.SpamDataset(csvs[name], tokenizer, context_length=CFG["context_length"])
        for name in ("train", "validation", "test")
    }
    model = copy.deepcopy(ours_init)
    torch.manual_seed(seed)
    train_loader = cls.create_classification_loader(data["train"], BATCH_SIZE, shuffle=True, drop_last=True)
    val_loader = cls.create_classification_loader(data["validation"], BATCH_SIZE)
    accuracies = cls.accuracy_callback({"train": train_loader, "validation": val_loader}, "cpu", EVAL_ITER)
    started = time.perf_counter()
    train_model(
        model,
        train_loader,
        val_loader,
        make_optimizer(model, LR, WEIGHT_DECAY),
        "cpu",
        1,
        EVAL_FREQ,
        EVAL_ITER,
        settings=TrainSettings(loss_fn=cls.classification_loss, epoch_end=accuracies),
        progress=False,
    )
    seconds = time.perf_counter() - started
    test_acc = cls.calc_accuracy_loader(
        cls.create_classification_loader(data["test"], BATCH_SIZE), model, "cpu"
    )
    torch.manual_seed(seed)  # the same shuffle again, to count the tokens the epoch padded to
    tokens = sum(ids.numel() for ids, _ in train_loader)
    return {"seconds": seconds, "test_acc": test_acc, "padded_length": "per batch", "train_tokens": tokens}


def warm_up(ours, book) -> None:
    """One forward and backward pass each, so first-call costs (allocations, kernel choice) are not timed."""
    ids = torch.randint(0, CFG["vocab_size"], (BATCH_SIZE, 32), generator=torch.Generator().manual_seed(0))
    for model in (ours, book):
        model.train()
        model(ids)[:, -1].sum().backward()
        model.zero_grad(set_to_none=True)


def subset_csvs(
    folder: Path, train_examples: int | None, test_examples: int | None = None
) -> dict[str, Path]:
    """The balanced split; the training and test CSVs cut to their first N rows when asked."""
    csvs = cls.prepare_spam_splits(folder / "splits")
    csvs["full_train"] = csvs["train"]
    for name, count in (("train", train_examples), ("test", test_examples)):
        if count:
            frame = cls.read_split(csvs[name]).iloc[:count]
            csvs[name] = folder / f"{name}-subset.csv"
            frame.to_csv(csvs[name], index=False)
    return csvs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--rounds", type=int, default=by_mode(full=2, quick=1), help="interleaved rounds")
    parser.add_argument(
        "--train-examples",
        type=int,
        default=by_mode(full=None, quick=64),
        help="train on the first N training messages (default: all 1,045; quick: 64)",
    )
    parser.add_argument(
        "--test-examples",
        type=int,
        default=None,
        help="score on the first N test messages (default: all 300)",
    )
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); on a shared, oversubscribed machine 1 thread "
        "avoids the cost of threads waiting for each other on every small operation",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quick={is_quick()}")
    with tempfile.TemporaryDirectory() as tmp:
        csvs = subset_csvs(Path(tmp), args.train_examples, args.test_examples)
        sizes = {name: len(cls.read_split(csvs[name])) for name in ("train", "test")}
        ours_init, book_init = make_models(args.seed)
        probe = cls.pad_batch([[40, 1842, 257], [15496, 11, 995, 0, 318]])
        meta = {
            "max_logit_difference_before_training": check_same_function(ours_init, book_init, probe),
            "trainable_parameters": cls.count_trainable(ours_init)[0],
            "total_parameters": cls.count_trainable(ours_init)[1],
            "train_examples": sizes["train"],
            "test_examples": sizes["test"],
            "seed": args.seed,
        }
        warm_up(ours_init, book_init)
        rounds = []
        for i in range(args.rounds):
            # Training is deterministic on the CPU (same weights, same batches), so the trained
            # models of later rounds equal the first round's: only the first is scored on the test split.
            book = run_book(book_init, csvs, args.seed, score_test=i == 0)
            ours = run_ours(ours_init, csvs, args.seed, score_test=i == 0)
            rounds.append({"book": book, "ours": ours})
            print(
                f"round {i + 1}: book {book['seconds']:.1f} s, ours {ours['seconds']:.1f} s, "
                f"ratio {book['seconds'] / ours['seconds']:.2f}x",
                flush=True,
            )
            # Written after every round, so a long run that is stopped still leaves its results.
            result = summarise(rounds, meta)
            write_json(args.out, result)
    print_table(result)
    print(f"\nwrote {args.out}")


def summarise(rounds: list[dict], meta: dict) -> dict:
    book_s = statistics.median(r["book"]["seconds"] for r in rounds)
    ours_s = statistics.median(r["ours"]["seconds"] for r in rounds)
    return {
        "benchmark": "classify",
        "environment": environment(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "torch": torch.__version__,
        "quick": is_quick(),
        "config": CFG,
        "weights": "random initialisation (OpenAI's GPT-2 weights unavailable), identical for both",
        **meta,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "eval_freq": EVAL_FREQ,
        "eval_iter": EVAL_ITER,
        "rounds": rounds,
        "book_seconds": book_s,
        "ours_seconds": ours_s,
        "book_test_acc": rounds[0]["book"]["test_acc"],
        "ours_test_acc": rounds[0]["ours"]["test_acc"],
        "speedup": book_s / ours_s,
    }


def print_table(result: dict) -> None:
    last = result["rounds"][-1]
    print(
        f"\nOne epoch on {result['train_examples']} training messages, batch {BATCH_SIZE}, CPU "
        f"({result['machine']['threads']} thread(s)), median of {len(result['rounds'])} rounds; "
        f"test accuracy of the first round on {result['test_examples']} test messages"
    )
    print(
        "| loop | padding, read position | tokens per epoch | seconds per epoch | test accuracy | speed-up |"
    )
    print("|---|---|---:|---:|---:|---:|")
    print(
        f"| book `train_classifier_simple` | all to {last['book']['padded_length']} tokens, final position | "
        f"{last['book']['train_tokens']:,} | {result['book_seconds']:.1f} | {result['book_test_acc'] * 100:.2f}% | 1.00x |"
    )
    print(
        f"| ours `train_model` + `classification_loss` | per batch, last real token | "
        f"{last['ours']['train_tokens']:,} | {result['ours_seconds']:.1f} | {result['ours_test_acc'] * 100:.2f}% | "
        f"{result['speedup']:.2f}x |"
    )


if __name__ == "__main__":
    main()
