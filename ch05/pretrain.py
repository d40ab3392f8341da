"""Pretrain a GPT model on a text corpus of any size: flat memory, exact resume, multi-process DDP.

From the repository root, on one text file or a folder of ``.txt`` files:

    python ch05/pretrain.py --data corpus/ --quick --max-steps 200 --out-dir runs/quick
    python -m torch.distributed.run --nproc_per_node=2 ch05/pretrain.py --data corpus/ ...

The script reads top to bottom: settings, data, model, optimizer, loop, save.

1. Data (``shared.corpus``): the corpus is tokenised once into a ``uint16`` file beside it
   (``--prepared-dir``) and reused while the files are unchanged. ``--prepare-only`` stops there.
2. Model: a preset (``--quick`` for a tiny one), or pretrained weights with ``--init-from``.
3. Loop: ``--max-steps`` optimizer steps, each one ``shared.train.train_step``. Step ``s`` reads
   windows drawn from ``(seed, s, micro-batch, rank)`` and seeds dropout from the same numbers,
   so everything a step does follows from the step number and the saved state.
4. Checkpoints (``shared.checkpoint``): every ``--checkpoint-every`` steps rank 0 writes
   ``step_<N>.pt`` atomically and keeps the last ``--keep-checkpoints``. ``--resume`` continues
   from the newest readable one and ends bitwise-equal, on a CPU, to a run that never stopped.
5. Save (``shared.train.save_training_run``) to ``--out-dir`` (default: a new folder under
   ``runs/``): ``config.json`` + ``model.safetensors`` (Hugging Face GPT-2 format),
   ``loss_log.csv``, ``loss.png`` and ``summary.json`` (speed).

Why not ``shared.train.train_model``: that loop runs over epochs of a data loader. Pretraining
counts optimizer steps over random windows and saves from rank 0 into a rotating set of files;
the step itself, the loss, the optimizer, the schedule and the checkpoint format are shared.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from shared.checkpoint import (
    CheckpointError,
    TrainHistory,
    load_checkpoint,
    newest_checkpoint,
    prepare_checkpoint_folder,
    save_step_checkpoint,
)
from shared.corpus import (
    CorpusError,
    PreparedCorpus,
    WindowSampler,
    fixed_windows,
    prepare_for_training,
    read_windows,
)
from shared.distributed import distributed_session, print_main
from shared.model import GPT_CONFIGS, GPTModel, count_parameters, set_dropout
from shared.train import (
    LossWatch,
    NonFiniteLossError,
    TrainSettings,
    WarmupCosine,
    autocast,
    calc_loss_batch,
    lr_at,
    make_optimizer,
    save_training_run,
    train_step,
)
from shared.utils import add_output_args, check_writable, eval_mode, get_device, run_dir
from shared.weights import HF_REPOS, download_gpt2, load_hf_gpt2

# Architectures. Every preset ties the embedding and the output head and has query/key/value
# biases, as OpenAI's GPT-2 does, so the output loads in Hugging Face's GPT2LMHeadModel.
QUICK = {**GPT_CONFIGS["gpt2-small"], "context_length": 64, "emb_dim": 64, "n_heads": 2, "n_layers": 2}
PRESETS = {
    name: dict(cfg, drop_rate=0.0, qkv_bias=True, tie_weights=True)
    for name, cfg in {"quick": QUICK, **GPT_CONFIGS}.items()
}
# Arguments that change what a run computes: a checkpoint from a run with other values is refused.
RUN_IDENTITY = (
    "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "decay", "max_steps", "weight_decay",
    "grad_clip", "seed", "init_from",
)  # fmt: skip


class RunError(RuntimeError):
    """A problem with the arguments or files that the user has to fix; printed without a traceback."""


# --------------------------------------------------------------------------------------------
# Settings
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
    model.add_argument("--preset", default="gpt2-small", choices=sorted(GPT_CONFIGS))
    model.add_argument("--quick", action="store_true", help="a tiny model (2 layers, 64 dims) for trying things out")
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
    train.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm; 0 turns it off")
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
    add_output_args(run, "pretrain")  # --out-dir: the final model, loss log and plot
    run.add_argument("--no-progress", action="store_true", help="no progress bar while preparing")
    args = parser.parse_args(argv)

    for name in ("batch_size", "grad_accum", "context_length", "eval_interval", "eval_batches",
                 "log_interval", "checkpoint_every", "keep_checkpoints"):  # fmt: skip
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.max_steps < 0:
        parser.error(f"--max-steps must be >= 0, got {args.max_steps}.")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir (where the checkpoints are).")
    args.warmup_steps = args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps
    args.min_lr = args.lr if args.decay == "constant" else (args.lr / 10 if args.min_lr is None else args.min_lr)
    try:  # the schedule's own checks (finite rates, min_lr <= lr, warm-up within the run), before any corpus work
        lr_at(0, peak_lr=args.lr, total_steps=args.max_steps, warmup_steps=args.warmup_steps, min_lr=args.min_lr)
    except ValueError as error:
        parser.error(f"{error} (peak_lr is --lr, min_lr --min-lr, warmup_steps --warmup-steps, total_steps --max-steps)")
    if not all(math.isfinite(value) and value >= 0 for value in (args.grad_clip, args.weight_decay)):
        parser.error(f"--grad-clip and --weight-decay must be >= 0 (0: off), got {args.grad_clip}, {args.weight_decay}.")
    args.preset = "quick" if args.quick else args.preset
    args.out_dir = run_dir(args.out_dir, "runs", "pretrain", create=False)  # rank 0 creates it
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
                raise RunError(f"--init-from {args.init_from!r} is neither a folder nor one of {sorted(HF_REPOS)}.")
            folder = download_gpt2(args.init_from)
        model = load_hf_gpt2(folder).float()
        if model.cfg["vocab_size"] != QUICK["vocab_size"]:
            raise RunError(f"{folder} has a vocabulary of {model.cfg['vocab_size']}; the corpus uses GPT-2's.")
    else:
        model = GPTModel(PRESETS[args.preset])
    limit = model.cfg["context_length"]
    args.context_length = args.context_length or limit
    if args.context_length > limit:
        raise RunError(f"--context-length {args.context_length} exceeds the model's {limit} positions.")
    # Dropout is a training choice, not part of the weights: set it on every layer that has it.
    return set_dropout(model, args.dropout).train()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (dropout): a function of the numbers, not of history."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def evaluate(model, corpus: PreparedCorpus, args, device, dtype) -> tuple[float, float]:
    """Mean loss on fixed, evenly spaced windows of each split (the same windows every time)."""
    losses = []
    with eval_mode(model):
        for span in (corpus.train, corpus.val):
            starts = fixed_windows(span, args.context_length, args.eval_batches * args.batch_size)
            total = torch.zeros((), device=device)
            for i in range(0, len(starts), args.batch_size):
                batch = starts[i : i + args.batch_size]
                inputs, targets = read_windows(corpus.tokens_path, corpus.num_tokens, batch, args.context_length)
                with autocast(device, dtype):
                    total += calc_loss_batch(inputs, targets, model, device).float() * len(batch)
            losses.append((total / len(starts)).item())
    return losses[0], losses[1]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def run_identity(args, model: GPTModel, corpus: PreparedCorpus, world_size: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run."""
    identity = {name: getattr(args, name) for name in RUN_IDENTITY}
    identity.update(model=dict(model.cfg), context_length=args.context_length, world_size=world_size,
                    corpus=corpus.fingerprint)  # fmt: skip
    return identity


def resume_history(args, rank: int, world_size: int, identity: dict, model, optimizer, schedule) -> TrainHistory:
    """Rank 0 picks the newest usable checkpoint; every rank loads that same file."""
    chosen = [None]
    if args.resume and rank == 0:
        chosen = [newest_checkpoint(args.checkpoint_dir, identity)]
        where = f"resuming from {chosen[0]}" if chosen[0] else f"no checkpoint in {args.checkpoint_dir}"
        print(where if chosen[0] else f"{where}: starting afresh", flush=True)
    if world_size > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return TrainHistory()
    return load_checkpoint(chosen[0], model, optimizer, lr_schedule=schedule)["history"]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(args, info) -> tuple[GPTModel, dict] | None:
    rank, world_size = info.rank, info.world_size
    device = info.device if world_size > 1 else get_device(args.device)

    # Data: rank 0 prepares the corpus, the others wait and open what it wrote.
    corpus = prepare_for_training(args.data, args.prepared_dir, val_fraction=args.val_fraction,
                                  progress=not args.no_progress)  # fmt: skip
    if args.prepare_only:
        return None

    # Model, identical on every rank (same seed; DDP also broadcasts rank 0's weights).
    torch.manual_seed(args.seed)
    model = build_model(args)
    corpus.check_fits(args.context_length)
    model.to(device)

    # Optimizer, schedule and the settings of one step.
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    schedule = WarmupCosine(optimizer, peak_lr=args.lr, total_steps=args.max_steps, warmup_steps=args.warmup_steps,
                            initial_lr=args.lr / (args.warmup_steps + 1), min_lr=args.min_lr)  # fmt: skip
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    settings = TrainSettings(grad_accum_steps=args.grad_accum, grad_clip=args.grad_clip or None, lr_schedule=schedule,
                             autocast_dtype=torch.bfloat16 if bf16 else None)  # fmt: skip
    identity = run_identity(args, model, corpus, world_size)
    if rank == 0:  # fail now, not after hours of training
        if args.checkpoint_dir:
            prepare_checkpoint_folder(args.checkpoint_dir)
        check_writable(args.out_dir, "output folder")
    history = resume_history(args, rank, world_size, identity, model, optimizer, schedule)

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: float32 range, much faster
    sampler = WindowSampler(corpus, "train", args.context_length, args.batch_size, args.seed, rank)
    tokens_per_step = args.batch_size * args.context_length * args.grad_accum * world_size
    print_main(f"model: {count_parameters(raw_model):,} parameters | {world_size} process(es) on {device} | "
               f"{'bfloat16' if bf16 else 'float32'} | {tokens_per_step:,} tokens per step | "
               f"steps {history.global_step} -> {args.max_steps}", flush=True)  # fmt: skip

    # The loop. Everything step s does follows from (seed, s, rank) and the saved state.
    train_seconds, train_tokens, running_loss, running_steps = 0.0, 0, 0.0, 0
    tick, watch = time.perf_counter(), LossWatch()
    while history.global_step < args.max_steps:
        step = history.global_step
        torch.manual_seed(step_seed(args.seed, step, rank))
        batches = [sampler.batch(step, micro) for micro in range(args.grad_accum)]
        loss, _ = train_step(model, optimizer, batches, history, settings, device)
        history.total_tokens += tokens_per_step
        train_tokens += tokens_per_step
        running_loss, running_steps, done = running_loss + loss, running_steps + 1, history.global_step
        watch.add(step, loss)
        if done % args.log_interval == 0 or done % args.checkpoint_every == 0 or done == args.max_steps:
            watch.check()  # NaN or inf: stop before it reaches a checkpoint or the output

        if done % args.log_interval == 0 or done == args.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - tick
            memory = f" | GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
            print_main(f"step {done:>6}/{args.max_steps} | loss {running_loss.item() / running_steps:.4f} | "
                       f"lr {history.lrs[-1]:.2e} | {train_tokens / max(train_seconds, 1e-9):,.0f} tokens/s{memory}",
                       flush=True)  # the loss's only host sync between evaluations  # fmt: skip
            running_loss, running_steps, tick = 0.0, 0, time.perf_counter()
        if rank == 0 and (done % args.eval_interval == 0 or done == args.max_steps):
            # Evaluation uses no collectives: the other ranks go on and wait at the next step.
            history.record_evaluation(done, *evaluate(raw_model, corpus, args, device, settings.autocast_dtype))
            print_main(f"step {done:>6}: train loss {history.train_losses[-1]:.4f} | "
                       f"val loss {history.val_losses[-1]:.4f}", flush=True)  # fmt: skip
            tick = time.perf_counter()  # the speed counts training only
        if rank == 0 and args.checkpoint_dir and (done % args.checkpoint_every == 0 or done == args.max_steps):
            save_step_checkpoint(args.checkpoint_dir, args.keep_checkpoints, raw_model, optimizer, history=history,
                                 lr_schedule=schedule, extra={"run": identity})  # fmt: skip
            tick = time.perf_counter()

    # Save: the model in Hugging Face's format, the loss log and plot, and the run's speed.
    summary = {
        "steps": history.global_step, "tokens_seen": history.total_tokens, "world_size": world_size,
        "device": str(device), "dtype": "bfloat16" if bf16 else "float32", "parameters": count_parameters(raw_model),
        "tokens_per_step": tokens_per_step, "corpus_tokens": corpus.num_tokens,
        "tokens_per_s": train_tokens / train_seconds if train_seconds else None,
        "ms_per_step": 1000 * train_seconds * tokens_per_step / train_tokens if train_tokens else None,
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }  # fmt: skip
    if rank == 0:
        if not history.eval_steps:  # a run with nothing left to do still reports where it stands
            history.record_evaluation(history.global_step, *evaluate(raw_model, corpus, args, device, settings.autocast_dtype))
        save_training_run(args.out_dir, raw_model, history, summary)
        print_main(f"wrote {args.out_dir}: config.json, model.safetensors, loss_log.csv, loss.png, summary.json")
    return raw_model, summary


def main(argv=None) -> tuple[GPTModel, dict] | None:
    """Run the script; returns the trained model (this process's copy) and the run's summary."""
    args = parse_args(argv)
    try:
        # Preparing a large corpus can take long while the other ranks wait at a barrier.
        with distributed_session(timeout=timedelta(hours=2), device=args.device) as info:
            return train(args, info)
    except (RunError, CorpusError, CheckpointError, OSError, ValueError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
