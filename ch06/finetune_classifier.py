"""Finetune a GPT model as a spam classifier, end to end (ch06).

    python ch06/finetune_classifier.py            # pretrained GPT-2 small, the book's settings
    python ch06/finetune_classifier.py --quick    # a small random GPT, two epochs
    python ch06/finetune_classifier.py --quick --device cpu --out-dir my-run

Steps: balance and split the SMS Spam Collection, tokenise, swap the head for a classifier,
freeze all but the top blocks, train with ``shared.train.train_model`` and the classification
loss, then report accuracies (``report.json``) and save the classifier, into a new folder
``ch06/runs/finetune_classifier/<date>-<time>/`` unless ``--out-dir`` names one. OpenAI's GPT-2
weights are downloaded when possible; offline (or with ``--quick``) a small randomly
initialised GPT, trained on all layers, stands in, and the report says so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from shared import classification as cls
from shared import lora
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import TrainSettings, make_optimizer, train_model
from shared.utils import exit_on_error, get_device, is_quick, run_dir, set_seed, write_json
from shared.weights import load_gpt2_or_standin

HERE = Path(__file__).resolve().parent
PADDINGS = ("dynamic", "longest", "context")


def blocks(text: str) -> int | str:
    """An argparse type for --trainable-blocks: 'all' or a whole number of blocks >= 0."""
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'all' nor a number of blocks (0, 1, 2, ...)")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-size",
        default="gpt2-small",
        choices=["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "small-random"],
        help="pretrained GPT-2 to start from, or small-random for the small randomly initialised GPT",
    )
    parser.add_argument(
        "--trainable-blocks",
        type=blocks,
        default=None,
        help="how many of the last transformer blocks train: an int, or 'all' for every layer "
        "(default: 1 for pretrained weights, 'all' for a random model)",
    )
    parser.add_argument("--pooling", default="last", choices=cls.POOLINGS, help="which position is read")
    parser.add_argument(
        "--no-causal-mask", action="store_true", help="bidirectional attention in the classification pass"
    )
    parser.add_argument(
        "--num-classes", type=int, default=2, choices=[1, 2], help="2: softmax + CE; 1: sigmoid + BCE"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=None,
        help="train LoRA adapters of this rank on every linear layer instead of whole blocks (appendix E)",
    )
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    parser.add_argument("--epochs", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--lr", type=float, default=None, help="default 5e-5 pretrained, 1e-3 random or LoRA")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="truncate messages to this many tokens (default: the model's context length)",
    )
    parser.add_argument(
        "--padding",
        default="dynamic",
        choices=PADDINGS,
        help="dynamic: each batch to its longest message; longest: every batch to the longest training "
        "message (the book); context: every batch to the full context length",
    )
    parser.add_argument("--eval-freq", type=int, default=50, help="evaluate losses every N optimizer steps")
    parser.add_argument(
        "--eval-iter", type=int, default=5, help="batches per loss/accuracy estimate during training"
    )
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--quick", action="store_true", help="toy sizes (also LLMS_QUICK=1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: a new folder in ch06/runs/finetune_classifier/"
    )
    parser.add_argument("--no-save", action="store_true", help="do not save the model")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "context_length", "eval_freq", "eval_iter"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lora_alpha is not None and args.lora_rank is None:
        parser.error("--lora-alpha needs --lora-rank")
    return args


def spam_loaders(args: argparse.Namespace, model_context_length: int) -> tuple[dict, int]:
    """Train/validation/test loaders of the balanced split, and the length messages are cut to.

    The split is the same every time (seed 123), whatever the training seed.
    """
    tokenizer = get_gpt2_tokenizer()
    paths = cls.prepare_spam_splits()
    context_length = min(
        args.context_length or model_context_length, model_context_length
    )  # None: the model's
    train_set = cls.SpamDataset(paths["train"], tokenizer, context_length=context_length)
    if args.padding == "longest":  # the book: pad to (and truncate at) the longest training message
        context_length = train_set.longest
    pad_to = {"dynamic": None, "longest": context_length, "context": context_length}[args.padding]
    datasets = {
        "train": train_set,
        "validation": cls.SpamDataset(paths["validation"], tokenizer, context_length=context_length),
        "test": cls.SpamDataset(paths["test"], tokenizer, context_length=context_length),
    }
    loaders = {
        name: cls.create_classification_loader(
            data, args.batch_size, shuffle=name == "train", drop_last=name == "train", pad_to=pad_to
        )
        for name, data in datasets.items()
    }
    return loaders, context_length


def finetune(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Run the whole pipeline; return the trained classifier and the report."""
    quick = args.quick or is_quick()
    device = get_device(args.device)
    set_seed(args.seed)
    started = time.perf_counter()

    want_pretrained = not quick and args.model_size != "small-random"
    model, description, pretrained = load_gpt2_or_standin(
        args.model_size if args.model_size != "small-random" else "gpt2-small", pretrained=want_pretrained
    )
    print(f"model: {description}")
    trainable_blocks = args.trainable_blocks
    if trainable_blocks is None:
        trainable_blocks = 1 if pretrained else "all"
    lr = args.lr if args.lr is not None else (5e-5 if pretrained and args.lora_rank is None else 1e-3)
    epochs = args.epochs if args.epochs is not None else (2 if quick else 5)

    loaders, context_length = spam_loaders(args, model.context_length)
    set_seed(args.seed)  # the head's initialisation and the shuffling depend on the seed only
    cls.make_classifier(
        model,
        num_classes=args.num_classes,
        trainable_blocks=trainable_blocks,
        pooling=args.pooling,
        causal=not args.no_causal_mask,
    )
    if args.lora_rank is not None:  # freezes everything else, the new head's weight included
        lora.apply_lora(model, args.lora_rank, args.lora_alpha if args.lora_alpha is not None else args.lora_rank)
    model.to(device)
    trainable, total = cls.count_trainable(model)
    print(f"trainable parameters: {trainable:,} of {total:,}")

    def log_epoch(epoch: int, model: torch.nn.Module) -> dict:
        metrics = cls.accuracy_callback(
            {"train": loaders["train"], "validation": loaders["validation"]}, device, args.eval_iter
        )(epoch, model)
        print(f"epoch {epoch}: " + ", ".join(f"{k} {v * 100:.2f}%" for k, v in metrics.items()))
        return metrics

    train_started = time.perf_counter()
    history = train_model(
        model,
        loaders["train"],
        loaders["validation"],
        make_optimizer(model, lr, args.weight_decay),
        device,
        epochs,
        args.eval_freq,
        args.eval_iter,
        settings=TrainSettings(loss_fn=cls.classification_loss, epoch_end=log_epoch),
        progress=args.progress,
    )
    train_seconds = time.perf_counter() - train_started
    accuracy = {name: cls.calc_accuracy_loader(loader, model, device) for name, loader in loaders.items()}
    print(", ".join(f"{name} accuracy {value * 100:.2f}%" for name, value in accuracy.items()))

    report = {
        "model": description,
        "pretrained": pretrained,
        "quick": quick,
        "device": str(device),
        "settings": {
            "model_size": args.model_size if pretrained else "small-random",
            "trainable_blocks": trainable_blocks,
            "pooling": args.pooling,
            "causal_mask": not args.no_causal_mask,
            "num_classes": args.num_classes,
            "epochs": epochs,
            "lr": lr,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "context_length": context_length,
            "padding": args.padding,
            "seed": args.seed,
            "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha,
        },
        "trainable_parameters": trainable,
        "total_parameters": total,
        "accuracy": accuracy,
        "epoch_metrics": history.epoch_metrics,
        "train_losses": history.train_losses,
        "val_losses": history.val_losses,
        "examples_seen": history.examples_seen,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    return model, report


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = run_dir(args.out_dir, HERE / "runs" / "finetune_classifier")
    model, report = finetune(args)
    if args.lora_rank is not None:  # fold the adapters in: an ordinary classifier to save and use
        lora.remove_lora(lora.merge_lora(model))
    if not args.no_save:
        cls.save_classifier(model, out_dir)
        report["saved_to"] = str(out_dir)
    write_json(out_dir / "report.json", report)
    print(f"report: {out_dir / 'report.json'}")
    texts = [
        "You are a winner! Reply WIN to claim your free prize now.",
        "Are we still on for dinner tonight?",
    ]
    for text, label in zip(texts, cls.classify_text(texts, model, get_gpt2_tokenizer()), strict=True):
        print(f"{label:>4}: {text}")
    return report


if __name__ == "__main__":
    exit_on_error(main)
