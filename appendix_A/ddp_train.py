"""Train appendix A's toy network with DistributedDataParallel (DDP).

Launch one process per GPU, or two on a CPU-only machine, from the repository root:

    python -m torch.distributed.run --nproc_per_node=2 appendix_A/ddp_train.py

(``torchrun`` is the same launcher under a shorter name.) Each process holds a full copy of
the model and trains on its own share of every epoch's shuffled data; after each backward
pass DDP averages the gradients over all processes, so every copy takes the same step and
the copies stay identical. Started plainly (``python appendix_A/ddp_train.py``), it trains
as a group of one.

The notebook ``appendix_A.ipynb`` builds these pieces one by one; this file is their final,
runnable form, and the notebook checks that its versions match these.

Every process writes what it did to ``<out-dir>/rank<N>.json`` (the sample indices of every
batch it trained on, accuracies, a checksum of its parameters) and its final weights to
``<out-dir>/rank<N>.pt``; the tests read those. ``--out-dir`` defaults to a new folder
``appendix_A/runs/ddp_train/<date>-<time>/`` (rank 0 makes it and tells the others).
``--device cpu`` trains on the CPU on a GPU machine too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from shared.distributed import DistributedInfo, distributed_session, mean_across_processes, print_main, unwrap
from shared.utils import run_dir, set_seed

HERE = Path(__file__).resolve().parent


def make_toy_data(num_samples: int, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clouds of 2-D points far apart, one per class; labels alternate 0, 1, 0, 1, ...

    A generator of its own makes the points depend on ``seed`` only, not on what else
    consumed random numbers before.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (one per class), got {num_samples}.")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % 2
    centres = torch.tensor([[-1.5, 2.0], [2.0, -1.5]])
    features = centres[labels] + 0.5 * torch.randn(num_samples, 2, generator=generator)
    return features, labels


class ToyDataset(Dataset):
    """Feature rows and their class labels, one pair per index."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        if len(features) != len(labels):
            raise ValueError(
                f"Got {len(features)} feature rows but {len(labels)} labels; need one label per row."
            )
        self.features = features
        self.labels = labels

    def __getitem__(self, index):
        return self.features[index], self.labels[index]

    def __len__(self):
        return len(self.labels)


class NeuralNetwork(nn.Module):
    """A multilayer perceptron: two hidden layers (30 and 20 units) with ReLU between layers.

    It returns logits (no softmax): ``F.cross_entropy`` applies log-softmax itself, which is
    numerically safer than taking the log of a softmax.
    """

    def __init__(self, num_inputs: int, num_outputs: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_inputs, 30),
            nn.ReLU(),
            nn.Linear(30, 20),
            nn.ReLU(),
            nn.Linear(20, num_outputs),
        )

    def forward(self, x):
        return self.layers(x)


@torch.no_grad()
def compute_accuracy(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> float:
    """Fraction of the loader's samples whose highest logit is the true class."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for features, labels in loader:
        predictions = model(features.to(device)).argmax(dim=-1)
        correct += (predictions == labels.to(device)).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct / total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    labels: torch.Tensor,
    accumulation_steps: int = 1,
) -> float:
    """One optimizer step on a batch, computed in ``accumulation_steps`` micro-batches.

    Gradients add up across ``backward()`` calls until ``zero_grad()``, so splitting a batch
    into k micro-batches and scaling each one's mean loss by its share of the batch gives the
    same gradient as the whole batch at once, with a k-th of the activation memory. Under DDP
    only the last micro-batch needs to average gradients across processes; ``no_sync()``
    skips that communication for the others. Returns the batch's mean loss.
    """
    if accumulation_steps < 1 or accumulation_steps > len(labels):
        raise ValueError(
            f"accumulation_steps must be between 1 and the batch size ({len(labels)}), got {accumulation_steps}."
        )
    optimizer.zero_grad()
    batch_loss = 0.0
    micro_batches = list(
        zip(features.chunk(accumulation_steps), labels.chunk(accumulation_steps), strict=True)
    )
    for step, (micro_features, micro_labels) in enumerate(micro_batches):
        is_last = step == len(micro_batches) - 1
        skip_sync = isinstance(model, DDP) and not is_last
        with model.no_sync() if skip_sync else nullcontext():
            share = len(micro_labels) / len(labels)
            loss = F.cross_entropy(model(micro_features), micro_labels) * share
            loss.backward()
        batch_loss += loss.item()
    optimizer.step()
    return batch_loss


def parameter_checksum(model: nn.Module) -> str:
    """sha256 of all parameters' bytes: equal checksums mean bit-identical models."""
    digest = hashlib.sha256()
    for name, parameter in model.state_dict().items():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="samples per process per optimizer step")
    parser.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per batch")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    parser.add_argument(
        "--num-samples", type=int, default=16, help="training samples in all (split over processes)"
    )
    parser.add_argument("--num-test-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: one GPU per process when there are GPUs)")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="per-process facts and weights (default: a new run folder)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="accepted like every script's; the toy run is quick-sized already"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "accumulation_steps", "num_samples", "num_test_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.batch_size % args.accumulation_steps:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --accumulation-steps "
            f"({args.accumulation_steps}) so that every micro-batch has the same size."
        )
    return args


def train(args: argparse.Namespace, info: DistributedInfo) -> dict:
    """Train on this process's share of the data; return what it did, for ``--facts-dir``."""
    # The same seed everywhere makes every process build the same data and the same initial
    # weights. (DDP would also copy rank 0's weights to the others when wrapping the model.)
    set_seed(args.seed)
    train_set = ToyDataset(*make_toy_data(args.num_samples, seed=args.seed))
    test_set = ToyDataset(*make_toy_data(args.num_test_samples, seed=args.seed + 1))

    # Each process draws a disjoint 1/world_size of every epoch's permutation. The sampler does
    # the shuffling, so the DataLoader's own shuffle stays off.
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed
    )
    if len(sampler) < args.batch_size:
        raise ValueError(
            f"Each of the {info.world_size} processes gets {len(sampler)} of the {args.num_samples} samples, "
            f"fewer than --batch-size {args.batch_size}, so it would never take a step. "
            "Lower --batch-size, raise --num-samples or start fewer processes."
        )
    # drop_last keeps every step's batch the same size on every process.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    eval_loaders = {
        "train": DataLoader(train_set, batch_size=args.batch_size),
        "test": DataLoader(test_set, batch_size=args.batch_size),
    }

    model = NeuralNetwork(num_inputs=2, num_outputs=2).to(info.device)
    ddp_model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr)

    batches_per_epoch = []
    for epoch in range(args.epochs):
        # Without set_epoch the sampler would repeat epoch 0's order every epoch.
        sampler.set_epoch(epoch)
        # The sampler is deterministic for a given seed and epoch, so this is exactly the
        # order the loader draws; drop_last leaves out an incomplete final batch.
        order = list(sampler)
        batches_per_epoch.append(
            [
                order[start : start + args.batch_size]
                for start in range(0, len(order) - args.batch_size + 1, args.batch_size)
            ]
        )
        losses = []
        for features, labels in train_loader:
            features, labels = features.to(info.device), labels.to(info.device)
            losses.append(train_step(ddp_model, optimizer, features, labels, args.accumulation_steps))
        # Every process calls this (it is a collective); only rank 0 prints.
        epoch_loss = mean_across_processes(sum(losses) / len(losses), device=info.device)
        print_main(f"epoch {epoch + 1:>2}/{args.epochs} | mean training loss {epoch_loss:.4f}")

    accuracy = {
        split: compute_accuracy(unwrap(ddp_model), loader, info.device)
        for split, loader in eval_loaders.items()
    }
    print_main(
        f"world size {info.world_size} ({info.backend} on {info.device.type}) | "
        f"train accuracy {accuracy['train']:.2f} | test accuracy {accuracy['test']:.2f}"
    )
    return {
        "rank": info.rank,
        "world_size": info.world_size,
        "backend": info.backend,
        "device": str(info.device),
        "batches_per_epoch": batches_per_epoch,
        "train_accuracy": accuracy["train"],
        "test_accuracy": accuracy["test"],
        "parameter_sha256": parameter_checksum(unwrap(ddp_model)),
        "state_dict": unwrap(ddp_model).state_dict(),
    }


def write_facts(facts: dict, folder: Path) -> None:
    """``rank<N>.json`` with everything but the weights, ``rank<N>.pt`` with the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    facts = dict(facts)
    state_dict = {name: tensor.cpu() for name, tensor in facts.pop("state_dict").items()}
    torch.save(state_dict, folder / f"rank{facts['rank']}.pt")
    (folder / f"rank{facts['rank']}.json").write_text(json.dumps(facts, indent=1))


def agree_on_out_dir(out_dir: Path | None) -> Path:
    """Rank 0 picks (and makes) the output folder; every process gets its path."""
    chosen = [str(run_dir(out_dir, HERE / "runs" / "ddp_train")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def main(argv=None) -> dict:
    args = parse_args(argv)
    with distributed_session(args.device) as info:
        out_dir = agree_on_out_dir(args.out_dir)
        facts = train(args, info)
    write_facts(facts, out_dir)
    print_main(f"wrote {os.path.relpath(out_dir)}")
    return facts


if __name__ == "__main__":
    main()
