"""Pretrain a GPT model on a text corpus of any size: flat memory, exact resume, multi-process DDP.

From the repository root, on one text file or a folder of ``.txt`` files:

    python ch05/pretrain.py --data corpus/ --preset quick --max-steps 200 --out runs/quick
    python -m torch.distributed.run --nproc_per_node=2 ch05/pretrain.py --data corpus/ ...

What it does, in order:

1. Prepares the corpus once (``shared.corpus``): tokenised into a ``uint16`` file beside the
   data (``--prepared-dir``), reused while the files are unchanged. ``--prepare-only`` stops there.
2. Builds the model from a preset, or loads pretrained weights with ``--init-from`` (continued
   pretraining).
3. Trains for ``--max-steps`` optimizer steps. Step ``s`` reads windows drawn from
   ``(seed, s, micro-batch, rank)`` and seeds dropout from the same numbers, so everything a
   step does follows from the step number and the saved model and optimizer state.
4. Every ``--checkpoint-every`` steps rank 0 writes ``step_<N>.pt`` atomically and keeps the
   last ``--keep-checkpoints``. ``--resume`` continues from the newest readable one (an
   unreadable one is skipped with a warning) and ends bitwise-equal, on a CPU, to a run that
   never stopped.
5. Writes ``--out``: ``config.json`` + ``model.safetensors`` (Hugging Face GPT-2 format),
   ``loss_log.csv``, ``loss.png`` and ``summary.json`` (speed and memory).

Why a loop of its own rather than ``shared.train.train_model``: that loop runs over epochs of
a data loader, with every process saving its own checkpoint file. Pretraining counts optimizer
steps over random windows, saves from rank 0 only into a rotating set of files, skips the
gradient all-reduce on accumulation micro-batches and runs under autocast; the pieces it shares
(loss, optimizer, schedule, checkpoint format) come from ``shared``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shared.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from shared.corpus import (
    CorpusError,
    PreparedCorpus,
    WindowSampler,
    default_prepared_dir,
    fixed_windows,
    prepare_corpus,
    read_windows,
)
from shared.data import data_dir
from shared.distributed import distributed_session, print_main
from shared.model import GPT_CONFIGS, GPTModel, count_parameters, set_dropout
from shared.train import TrainHistory, WarmupCosine, autocast, calc_loss_batch, make_optimizer
from shared.utils import eval_mode, get_device
from shared.weights import HF_REPOS, download_gpt2, load_hf_gpt2, save_hf_gpt2

GPT2_VOCAB = 50257
# Architectures. Every preset ties the embedding and the output head and has query/key/value
# biases, as OpenAI's GPT-2 does, so the output loads in Hugging Face's GPT2LMHeadModel.
PRESETS = {
    "quick": {
        "vocab_size": GPT2_VOCAB,
        "context_length": 64,
        "emb_dim": 64,
        "n_heads": 2,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": True,
    },
    **{name: dict(cfg, drop_rate=0.0, qkv_bias=True) for name, cfg in GPT_CONFIGS.items()},
}
for _cfg in PRESETS.values():
    _cfg["tie_weights"] = True

# Arguments that change what a run computes: a checkpoint from a run with other values is refused.
RUN_IDENTITY = (
    "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "decay", "max_steps", "weight_decay",
    "grad_clip", "seed", "init_from",
)  # fmt: skip


class RunError(RuntimeError):
    """A problem with the arguments, files or checkpoints that the user has to fix; printed without a traceback."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="a UTF-8 text file or a folder of .txt files")
    data.add_argument("--prepared-dir", help="where the tokenised corpus goes (default: <data>.tokens, "
                      "or a folder in the course's data directory when the data's folder is read-only)")  # fmt: skip
    data.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation")
    data.add_argument("--prepare-only", action="store_true", help="tokenise the corpus, then stop")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    model.add_argument("--init-from", help="gpt2-small/-medium/-large/-xl or a Hugging Face GPT-2 folder")
    model.add_argument("--context-length", type=int, help="tokens per window (default: the model's)")
    model.add_argument("--dropout", type=float, default=0.0)
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in total")
    train.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per process")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    train.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    train.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 10%% of max steps)")
    train.add_argument("--decay", choices=["cosine", "constant"], default="cosine")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument(
        "--grad-clip", type=float, default=1.0, help="max global gradient norm; 0 turns it off"
    )
    train.add_argument("--seed", type=int, default=123)
    run = parser.add_argument_group("run")
    run.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (and at the end)")
    run.add_argument("--eval-batches", type=int, default=10, help="batches per split per evaluation")
    run.add_argument("--log-interval", type=int, default=10)
    run.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                     help="auto: bfloat16 autocast on GPUs that support it, else float32")  # fmt: skip
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--checkpoint-dir", help="where resumable checkpoints go (none when unset)")
    run.add_argument("--checkpoint-every", type=int, default=100)
    run.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    run.add_argument("--out", help="folder for the final model, loss log and plot")
    run.add_argument("--no-progress", action="store_true", help="no progress bar while preparing")
    args = parser.parse_args(argv)

    def positive(name):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")

    for name in ("batch_size", "grad_accum", "context_length", "eval_interval", "eval_batches",
                 "log_interval", "checkpoint_every", "keep_checkpoints"):  # fmt: skip
        positive(name)
    if args.max_steps < 0:
        parser.error(f"--max-steps must be >= 0, got {args.max_steps}.")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}.")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir (where the checkpoints are).")
    if args.warmup_steps is None:
        args.warmup_steps = args.max_steps // 10
    if not 0 <= args.warmup_steps <= args.max_steps:
        parser.error(f"--warmup-steps must be between 0 and --max-steps, got {args.warmup_steps}.")
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.decay == "constant":
        args.min_lr = args.lr
    return args


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(args) -> GPTModel:
    """A fresh model from the preset, or pretrained weights (``--init-from``), set up for this run."""
    if args.init_from:
        folder = Path(args.init_from)
        if not folder.is_dir():
            if args.init_from not in HF_REPOS:
                raise RunError(
                    f"--init-from {args.init_from!r} is neither a folder nor one of {sorted(HF_REPOS)}."
                )
            folder = download_gpt2(args.init_from)
        model = load_hf_gpt2(folder).float()
        if model.cfg["vocab_size"] != GPT2_VOCAB:
            raise RunError(
                f"{folder} has a vocabulary of {model.cfg['vocab_size']}; the corpus uses GPT-2's {GPT2_VOCAB}."
            )
    else:
        model = GPTModel(PRESETS[args.preset])
    limit = model.cfg["context_length"]
    args.context_length = args.context_length or limit
    if args.context_length > limit:
        raise RunError(f"--context-length {args.context_length} exceeds the model's {limit} positions.")
    # Dropout is a training choice, not part of the weights: set it on every layer that has it.
    return set_dropout(model, args.dropout).train()


def autocast_for(device: torch.device, dtype: str):
    """bfloat16 autocast on GPUs that support it (``auto``), or when asked; otherwise float32."""
    use_bf16 = dtype == "bfloat16" or (
        dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return nullcontext, "float32"
    return (lambda: autocast(device, torch.bfloat16)), "bfloat16"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def run_identity(args, model: GPTModel, corpus: PreparedCorpus, world_size: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    identity = {name: getattr(args, name) for name in RUN_IDENTITY}
    identity.update(
        model=dict(model.cfg), context_length=args.context_length, world_size=world_size,
        corpus=corpus.fingerprint,
    )  # fmt: skip
    return identity


def _describe_differences(saved: dict, current: dict) -> str:
    names = sorted(set(saved) | set(current))
    return "; ".join(
        f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        for name in names
        if saved.get(name) != current.get(name)
    )


def choose_checkpoint(folder: Path, identity: dict) -> Path | None:
    """The newest readable checkpoint in ``folder`` (None when there is none).

    An unreadable file (truncated, corrupt) is skipped with a warning; a readable one from a
    different run (other config, corpus or hyper-parameters) is refused.
    """
    for path in reversed(step_checkpoints(folder)):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as error:
            print(
                f"warning: {error}\n  -> falling back to the previous checkpoint.",
                file=sys.stderr,
                flush=True,
            )
            continue
        saved = checkpoint.get("extra", {}).get("run", {})
        if saved != identity:
            raise RunError(
                f"{path} belongs to a different run, so it cannot be resumed with these arguments. "
                f"Differences: {_describe_differences(saved, identity)}. Use the original arguments, "
                "or another --checkpoint-dir for a new run."
            )
        return path
    if step_checkpoints(folder):
        raise RunError(f"no checkpoint in {folder} is readable; remove them or start without --resume.")
    return None


def save_rotating(folder: Path, keep: int, model, optimizer, history, schedule, identity) -> Path:
    """Write ``step_<N>.pt`` atomically, then delete all but the newest ``keep``."""
    path = folder / f"step_{history.global_step:08d}.pt"
    save_checkpoint(path, model, optimizer, history=history, lr_schedule=schedule, extra={"run": identity})
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def prepared_dir_for(data: str, chosen: str | None) -> Path:
    """``--prepared-dir``, else ``<data>.tokens`` beside the data, else (read-only data) the course's data folder."""
    if chosen:
        return Path(chosen)
    beside = default_prepared_dir(data)
    if beside.is_dir() or os.access(beside.parent, os.W_OK):
        return beside
    tag = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:8]
    return data_dir() / "prepared-corpora" / f"{beside.name}-{tag}"


def check_writable(folder: Path, what: str) -> None:
    """Fail before training, not after hours of it, when ``folder`` cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RunError(f"cannot write to the {what} {folder}: {error}. Choose a writable folder.") from error


def remove_stale_temporaries(folder: Path) -> None:
    """Half-written checkpoints from a run killed while saving (they never replaced a good file)."""
    for path in folder.glob(".step_*.part"):  # shared.utils.atomic_path's temporary names
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Evaluation and outputs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, corpus: PreparedCorpus, args, device, autocast) -> tuple[float, float]:
    """Mean loss on fixed, evenly spaced windows of each split (the same windows every time)."""
    losses = []
    with eval_mode(model):
        for span in (corpus.train, corpus.val):
            starts = fixed_windows(span, args.context_length, args.eval_batches * args.batch_size)
            total = torch.zeros((), device=device)
            batches = [starts[i : i + args.batch_size] for i in range(0, len(starts), args.batch_size)]
            for batch_starts in batches:
                inputs, targets = read_windows(
                    corpus.tokens_path, corpus.num_tokens, batch_starts, args.context_length
                )
                with autocast():
                    total += calc_loss_batch(inputs, targets, model, device).float() * len(batch_starts)
            losses.append((total / len(starts)).item())
    return losses[0], losses[1]


def write_outputs(out: Path, model: GPTModel, history: TrainHistory, summary: dict) -> None:
    """Model (HF format), loss log, plot and summary; each file is written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pretrain-out.", dir=out))
    try:
        save_hf_gpt2(model, staging)
        with open(staging / "loss_log.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["step", "tokens_seen", "lr", "train_loss", "val_loss"])
            for step, tokens, train, val in zip(
                history.eval_steps, history.tokens_seen, history.train_losses, history.val_losses, strict=True
            ):
                writer.writerow(
                    [
                        step,
                        tokens,
                        f"{history.lrs[step - 1]:.6g}" if step else 0,
                        f"{train:.6f}",
                        f"{val:.6f}",
                    ]
                )
        plot_losses(history, staging / "loss.png")
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for file in staging.iterdir():
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plot_losses(history: TrainHistory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.eval_steps, history.train_losses, marker="o", label="training")
    ax.plot(history.eval_steps, history.val_losses, marker="o", linestyle="--", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parameter_digest(model) -> str:
    """sha256 of every parameter's bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (dropout): a function of the numbers, not of history."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def run_step(
    model, optimizer, schedule, sampler, step: int, *, seed: int, rank: int, grad_accum: int,
    grad_clip: float, params, device, autocast, ddp: bool,
) -> torch.Tensor:  # fmt: skip
    """One optimizer step: ``grad_accum`` micro-batches of this step's windows; returns the mean loss (on the device).

    The dropout seed and the windows are functions of ``(seed, step, rank)``, so the step does
    the same thing whether or not the run was interrupted before it.
    """
    torch.manual_seed(step_seed(seed, step, rank))
    schedule.apply(step)
    total = None
    for micro in range(grad_accum):
        inputs, targets = sampler.batch(step, micro)
        # Under DDP only the last micro-batch needs the gradient all-reduce.
        sync = model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext()
        with sync:
            with autocast():
                loss = calc_loss_batch(inputs, targets, model, device) / grad_accum
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train(args, info) -> dict | None:
    rank, world_size = info.rank, info.world_size
    device = info.device if world_size > 1 else get_device(args.device)
    if world_size > 1 and args.device and torch.device(args.device).type != device.type:
        raise RunError(
            f"under torchrun the device comes from LOCAL_RANK ({device}); --device {args.device} conflicts."
        )

    # 1. The corpus: rank 0 prepares it, the others wait and open what it wrote.
    prepared_dir = prepared_dir_for(args.data, args.prepared_dir)
    if rank == 0:
        started = time.perf_counter()
        corpus = prepare_corpus(
            args.data, prepared_dir, val_fraction=args.val_fraction, progress=not args.no_progress
        )
        what = "reused" if corpus.reused else f"prepared in {time.perf_counter() - started:.1f} s"
        print(f"corpus: {corpus.num_tokens:,} tokens ({what}) in {corpus.folder}; "
              f"train {corpus.train[1] - corpus.train[0]:,}, validation {corpus.val[1] - corpus.val[0]:,}", flush=True)  # fmt: skip
    if world_size > 1:
        dist.barrier()
        if rank != 0:
            corpus = PreparedCorpus.open(prepared_dir)
    if args.prepare_only:
        return None

    # 2. The model, identical on every rank (same seed; DDP also broadcasts rank 0's weights).
    torch.manual_seed(args.seed)
    model = build_model(args)
    corpus.check_fits(args.context_length)
    model.to(device)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    schedule = WarmupCosine(
        optimizer,
        peak_lr=args.lr,
        total_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        initial_lr=args.lr / (args.warmup_steps + 1),
        min_lr=args.min_lr,
    )
    identity = run_identity(args, model, corpus, world_size)
    history = TrainHistory()

    # 3. Resume: rank 0 picks the checkpoint, every rank loads that same file.
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if checkpoint_dir is not None and rank == 0:
        check_writable(checkpoint_dir, "checkpoint folder")
        remove_stale_temporaries(checkpoint_dir)
    if args.out and rank == 0:
        check_writable(Path(args.out), "output folder")
        for stale in Path(args.out).glob(".pretrain-out.*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
    chosen = [None]
    if args.resume and rank == 0:
        chosen = [choose_checkpoint(checkpoint_dir, identity)]
        print(
            f"resuming from {chosen[0]}"
            if chosen[0]
            else f"no checkpoint in {checkpoint_dir}: starting afresh",
            flush=True,
        )
    if world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is not None:
        history = load_checkpoint(chosen[0], model, optimizer, lr_schedule=schedule)["history"]

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: float32 range, much faster
    autocast, dtype_name = autocast_for(device, args.dtype)

    sampler = WindowSampler(corpus, "train", args.context_length, args.batch_size, args.seed, rank)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tokens_per_step = args.batch_size * args.context_length * args.grad_accum * world_size
    print_main(
        f"model: {count_parameters(raw_model):,} parameters | {world_size} process(es) on {device} | {dtype_name} | "
        f"{tokens_per_step:,} tokens per step | steps {history.global_step} -> {args.max_steps}",
        flush=True,
    )

    # 4. The loop. Everything step s does follows from (seed, s, rank) and the saved state.
    train_seconds, train_tokens, running_loss, running_steps = 0.0, 0, None, 0
    tick = time.perf_counter()
    while history.global_step < args.max_steps:
        step = history.global_step
        loss = run_step(
            model, optimizer, schedule, sampler, step, seed=args.seed, rank=rank, grad_accum=args.grad_accum,
            grad_clip=args.grad_clip, params=params, device=device, autocast=autocast, ddp=world_size > 1,
        )  # fmt: skip
        running_loss = loss if running_loss is None else running_loss + loss
        history.lrs.append(optimizer.param_groups[0]["lr"])
        history.global_step += 1
        running_steps += 1
        history.total_tokens += tokens_per_step
        train_tokens += tokens_per_step
        done = history.global_step

        if done % args.log_interval == 0 or done == args.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            train_seconds += now - tick
            mean_loss = running_loss.item() / running_steps  # the only host sync between evaluations
            memory = (
                f" | GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                if device.type == "cuda"
                else ""
            )
            print_main(
                f"step {done:>6}/{args.max_steps} | loss {mean_loss:.4f} | lr {history.lrs[-1]:.2e} | "
                f"{train_tokens / max(train_seconds, 1e-9):,.0f} tokens/s{memory}",
                flush=True,
            )
            running_loss, running_steps = None, 0
            tick = time.perf_counter()
        if done % args.eval_interval == 0 or done == args.max_steps:
            if rank == 0:  # evaluation uses no collectives: the other ranks go on and wait at the next step
                train_loss, val_loss = evaluate(raw_model, corpus, args, device, autocast)
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.eval_steps.append(done)
                history.tokens_seen.append(history.total_tokens)
                print_main(
                    f"step {done:>6}: train loss {train_loss:.4f} | val loss {val_loss:.4f}", flush=True
                )
            tick = time.perf_counter()
        if checkpoint_dir is not None and (done % args.checkpoint_every == 0 or done == args.max_steps):
            if rank == 0:
                save_rotating(
                    checkpoint_dir, args.keep_checkpoints, raw_model, optimizer, history, schedule, identity
                )
            tick = time.perf_counter()

    # 5. Outputs, and a check that DDP kept every copy identical.
    digest = parameter_digest(raw_model)
    digests = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(digests, digest)
    else:
        digests = [digest]
    summary = {
        "steps": history.global_step,
        "tokens_seen": history.total_tokens,
        "world_size": world_size,
        "device": str(device),
        "dtype": dtype_name,
        "parameters": count_parameters(raw_model),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": train_tokens / train_seconds if train_seconds else None,
        "ms_per_step": 1000 * train_seconds / (train_tokens / tokens_per_step) if train_tokens else None,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "rank_parameter_sha256": digests,
        "corpus_tokens": corpus.num_tokens,
    }
    if rank == 0 and args.out:
        if not history.eval_steps:  # a run with nothing left to do still reports where it stands
            train_loss, val_loss = evaluate(raw_model, corpus, args, device, autocast)
            history.train_losses.append(train_loss)
            history.val_losses.append(val_loss)
            history.eval_steps.append(history.global_step)
            history.tokens_seen.append(history.total_tokens)
        write_outputs(Path(args.out), raw_model, history, summary)
        print_main(f"wrote {args.out}: config.json, model.safetensors, loss_log.csv, loss.png, summary.json")
    return summary


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.device:
        os.environ["LLMS_DEVICE"] = args.device  # picks the device of every rank in shared.distributed
    try:
        # Preparing a large corpus can take long while the other ranks wait at a barrier.
        with distributed_session(timeout=timedelta(hours=2)) as info:
            return train(args, info)
    except (RunError, CorpusError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
