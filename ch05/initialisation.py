"""Why the ch05 run stalls or memorises: the same training from three initialisations.

The ch05 notebook's run (GPT-2 small, context 256, batch 2, AdamW lr 4e-4 and weight decay 0.1,
10 epochs on The Verdict, evaluation every 5 steps on 5 batches) from three starting points:

- ``gpt2``: GPT-2's initialisation, what ``GPTModel`` uses by default: N(0, 0.02) weights and
  embeddings, residual projections scaled down by 1/sqrt(2 * n_layers);
- ``pytorch``: every layer keeps PyTorch's own default, as in the book's model, which never
  re-initialises: embeddings N(0, 1), linear layers uniform in +-1/sqrt(fan_in)
  (``model.reset_parameters("pytorch")``);
- ``gpt2_embeddings_n01``: GPT-2's initialisation except the two embeddings, drawn from N(0, 1),
  to isolate which difference matters.

Each is run for every seed given; the data order and the dropout masks follow the seed. The
losses after each epoch go to ``initialisation.json`` in ``--out-dir`` (default: a new folder
under ``runs/``; ``--refresh-committed`` replaces the committed ``ch05/initialisation.json``)
and a table is printed. On a GPU the whole comparison takes under a minute; on a laptop CPU
each run takes 5-50 minutes.

    python ch05/initialisation.py --device cuda --seeds 123 7
    python ch05/initialisation.py --quick --epochs 1      # a smoke test with a tiny model (or LLMS_QUICK=1)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from shared.data import load_the_verdict
from shared.dataloader import train_val_loaders
from shared.model import GPT_CONFIGS, GPTModel
from shared.train import train_model
from shared.utils import add_output_args, atomic_path, get_device, is_quick, run_dir

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "full": {**GPT_CONFIGS["gpt2-small"], "context_length": 256},
    "quick": {**GPT_CONFIGS["gpt2-small"], "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2},
}
SCHEMES = ("gpt2", "pytorch", "gpt2_embeddings_n01")


def initialised_model(cfg: dict, scheme: str, seed: int) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(cfg)  # GPT-2's initialisation
    if scheme == "pytorch":
        model.reset_parameters("pytorch")
    elif scheme == "gpt2_embeddings_n01":
        nn.init.normal_(model.tok_emb.weight, std=1.0)
        nn.init.normal_(model.pos_emb.weight, std=1.0)
    return model


def run(cfg: dict, scheme: str, seed: int, epochs: int, device) -> dict:
    model = initialised_model(cfg, scheme, seed).to(device)
    train_loader, val_loader = train_val_loaders(load_the_verdict(), cfg["context_length"])
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    started = time.perf_counter()
    history = train_model(model, train_loader, val_loader, optimizer, device, epochs, 5, 5, progress=False)
    seconds = time.perf_counter() - started
    # Evaluations happen after steps 0, 5, 10, ...; an epoch is len(train_loader) steps. Per
    # epoch we keep its last evaluation.
    steps_per_epoch = len(train_loader)
    epoch_end = [
        max(i for i, step in enumerate(history.eval_steps) if step < (epoch + 1) * steps_per_epoch)
        for epoch in range(epochs)
    ]
    return {
        "scheme": scheme,
        "seed": seed,
        "final_train_loss": history.train_losses[-1],
        "final_val_loss": history.val_losses[-1],
        "min_val_loss": min(history.val_losses),
        "train_loss_per_epoch": [history.train_losses[i] for i in epoch_end],
        "val_loss_per_epoch": [history.val_losses[i] for i in epoch_end],
        "eval_steps": history.eval_steps,
        "train_losses": history.train_losses,
        "val_losses": history.val_losses,
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[123])
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--device", default=None, help="default: the best available (shared.utils)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, same code (as LLMS_QUICK=1)")
    add_output_args(parser, "initialisation", committed=HERE)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    out = run_dir(args.out_dir, "runs", "initialisation", committed=HERE, refresh=args.refresh_committed) / "initialisation.json"
    cfg = CONFIGS["quick" if args.quick or is_quick() else "full"]
    device = get_device(args.device)  # None: the best available; a name is checked against this machine

    runs = []
    print("| initialisation | seed | train loss at each epoch's last evaluation | final train | final val | min val |")
    print("|---|---:|---|---:|---:|---:|")
    for seed in args.seeds:
        for scheme in args.schemes:
            row = run(cfg, scheme, seed, args.epochs, device)
            runs.append(row)
            per_epoch = " ".join(f"{loss:.2f}" for loss in row["train_loss_per_epoch"])
            print(f"| {scheme} | {seed} | {per_epoch} | {row['final_train_loss']:.2f} | "
                  f"{row['final_val_loss']:.2f} | {row['min_val_loss']:.2f} |", flush=True)  # fmt: skip
    payload = {
        "settings": {
            "config": cfg, "epochs": args.epochs, "batch": 2, "optimizer": "AdamW(lr=4e-4, weight_decay=0.1)",
            "eval_freq": 5, "eval_iter": 5, "data": "The Verdict, 90/10 split, stride 256",
        },  # fmt: skip
        "hardware": {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
