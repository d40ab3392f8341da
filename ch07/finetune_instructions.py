"""Instruction-finetune a GPT model on the 1,100-entry Alpaca-style data set (chapter 7 as a script).

The pipeline of the notebook: load and split the data (935 train / 110 test / 55 validation),
tokenise it in the chosen prompt style, load the pretrained model, finetune it with AdamW through
``shared.train.train_model``, answer the 110 test instructions with batched greedy generation,
and write

into ``--out-dir`` (default: a new folder ``ch07/runs/finetune_instructions/<date>-<time>/``):

- ``<out-dir>/model/`` the finetuned model as a GPT-2 checkpoint (config.json + model.safetensors),
- ``<out-dir>/test-responses.json`` the test entries with a ``model_response`` each,
- ``<out-dir>/finetune-report.json`` losses, timings and the settings used.

Examples::

    python ch07/finetune_instructions.py                          # GPT-2 medium, the book's settings
    python ch07/finetune_instructions.py --model gpt2-small --epochs 1
    python ch07/finetune_instructions.py --model-dir path/to/gpt2-checkpoint --style phi3 --mask-instructions
    python ch07/finetune_instructions.py --quick --device cpu     # tiny random model

Without network (no GPT-2 weights) the script falls back to a tiny random model and says so.
Score the responses afterwards with ``ch07/evaluate_responses.py``.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from shared import lora
from shared.data import load_instruction_data
from shared.instruction import (
    PRETRAINED_LR,
    PROMPT_STYLES,
    SMALL_MODEL_CONFIG,
    SMALL_MODEL_LR,
    InstructionDataset,
    collate_fn,
    format_prompt,
    generate_responses,
    split_entries,
)
from shared.model import GPT_CONFIGS
from shared.tokenizer import get_gpt2_tokenizer
from shared.train import TrainSettings, calc_loss_loader, make_optimizer, train_model
from shared.utils import exit_on_error, get_device, is_quick, run_dir, set_seed, write_json
from shared.weights import load_gpt2_or_standin, save_hf_gpt2

HERE = Path(__file__).resolve().parent

# Quick mode shrinks the data and the generation length, and finetunes the tiny stand-in model.
QUICK_SIZES = {"train": 160, "val": 24, "test": 110, "max_new_tokens": 24}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="gpt2-medium", choices=list(GPT_CONFIGS), help="GPT-2 size to download"
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a local GPT-2 checkpoint folder instead of a download"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: 5e-5 GPT-2, 1e-3 tiny model)")
    parser.add_argument(
        "--lora-rank", type=int, default=None,
        help="train LoRA adapters of this rank on every linear layer instead of all weights (appendix E)",
    )
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--style", default="alpaca", choices=PROMPT_STYLES, help="prompt format")
    parser.add_argument(
        "--mask-instructions",
        action="store_true",
        help="train on the responses only (prompt targets ignored)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="truncate training sequences to this many tokens (default: the model's context length)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="length limit of each response")
    parser.add_argument("--eval-freq", type=int, default=5, help="evaluate every N optimizer steps")
    parser.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    parser.add_argument("--quick", action="store_true", help="tiny model and data subset (also LLMS_QUICK=1)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: a new folder in ch07/runs/finetune_instructions/"
    )
    args = parser.parse_args(argv)
    args.quick = args.quick or is_quick()
    if args.lora_alpha is not None and args.lora_rank is None:
        parser.error("--lora-alpha needs --lora-rank")
    for name in ("epochs", "batch_size", "max_new_tokens", "eval_freq", "eval_iter", "context_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_splits(args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, validation) entries, cut to the quick sizes in quick mode; refuses a batch
    size larger than the training data (whole batches only: it would train 0 steps)."""
    train_data, test_data, val_data = split_entries(load_instruction_data())
    if args.quick:
        train_data, val_data = train_data[: QUICK_SIZES["train"]], val_data[: QUICK_SIZES["val"]]
        test_data = test_data[: QUICK_SIZES["test"]]
        args.max_new_tokens = min(args.max_new_tokens, QUICK_SIZES["max_new_tokens"])
    if args.batch_size > len(train_data):
        raise SystemExit(
            f"error: --batch-size {args.batch_size} is larger than the {len(train_data)} training entries, "
            f"so not one whole batch would train; use --batch-size {len(train_data)} or less."
        )
    print(f"train {len(train_data)}, validation {len(val_data)}, test {len(test_data)} entries")
    return train_data, test_data, val_data


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    device = get_device(args.device)
    train_data, test_data, val_data = load_splits(args)
    out_dir = run_dir(args.out_dir, HERE / "runs" / "finetune_instructions")
    tokenizer = get_gpt2_tokenizer()

    model, description, pretrained = load_gpt2_or_standin(
        args.model,
        pretrained=not args.quick,
        model_dir=args.model_dir,
        standin_config=SMALL_MODEL_CONFIG,
        seed=args.seed,
    )
    model.to(device)
    if args.lora_rank is not None:  # freezes everything else; a head tied to the embedding is left out
        alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
        print(f"LoRA rank {args.lora_rank}: {lora.apply_lora(model, args.lora_rank, alpha):,} trainable parameters")
    args.lr = args.lr or (PRETRAINED_LR if pretrained and args.lora_rank is None else SMALL_MODEL_LR)
    print(f"model: {description}; learning rate {args.lr}")
    context_length = args.context_length or model.context_length
    collate = functools.partial(
        collate_fn, context_length=context_length, device=device, mask_instructions=args.mask_instructions
    )
    loader = functools.partial(DataLoader, batch_size=args.batch_size, collate_fn=collate, num_workers=0)
    train_loader = loader(InstructionDataset(train_data, tokenizer, args.style), shuffle=True, drop_last=True)
    val_loader = loader(InstructionDataset(val_data, tokenizer, args.style), shuffle=False, drop_last=False)

    with torch.no_grad():
        model.eval()
        val_before = calc_loss_loader(val_loader, model, device, num_batches=args.eval_iter)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    start = time.perf_counter()
    history = train_model(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        num_epochs=args.epochs,
        eval_freq=args.eval_freq,
        eval_iter=args.eval_iter,
        start_context=format_prompt(val_data[0], args.style),
        tokenizer=tokenizer,
        settings=TrainSettings(max_new_tokens=min(35, args.max_new_tokens)),
    )
    train_seconds = time.perf_counter() - start
    if args.lora_rank is not None:  # fold the adapters in: no extra work per generated token
        lora.remove_lora(lora.merge_lora(model))
    with torch.no_grad():
        model.eval()
        val_after = calc_loss_loader(val_loader, model, device, num_batches=args.eval_iter)
    print(f"finetuned in {train_seconds / 60:.1f} min; validation loss {val_before:.3f} -> {val_after:.3f}")

    start = time.perf_counter()
    prompts = [format_prompt(entry, args.style) for entry in test_data]
    responses = generate_responses(
        model, tokenizer, prompts, args.max_new_tokens, batch_size=8, progress=True
    )
    generate_seconds = time.perf_counter() - start
    print(f"generated {len(responses)} responses in {generate_seconds:.1f} s")

    save_hf_gpt2(model, out_dir / "model")
    write_json(
        out_dir / "test-responses.json",
        [{**entry, "model_response": response} for entry, response in zip(test_data, responses, strict=True)],
    )
    report = {
        "model": description,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": str(device),
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "train_losses": history.train_losses,
        "val_losses": history.val_losses,
        "tokens_seen": history.tokens_seen,
        "train_seconds": train_seconds,
        "generate_seconds": generate_seconds,
    }
    write_json(out_dir / "finetune-report.json", report)
    print(f"wrote {out_dir / 'model'}, {out_dir / 'test-responses.json'} and finetune-report.json")
    return report


if __name__ == "__main__":
    exit_on_error(main)
