"""Benchmark: our GPTModel vs Hugging Face GPT-2 vs the book's reference code, on CPU.

Measures, in one process:

1. training throughput (tokens/s of forward + backward + AdamW step) of a GPT-2-small-sized
   model, batch 2 x 256, dropout 0, the same batches and optimizer settings for every model,
   each with torch's default AdamW (foreach) and with ``fused=True``. The main comparison
   uses an untied output head everywhere (the book's reference models cannot tie); two extra
   rows compare ours and Hugging Face's with tied heads (GPT-2's own setting);
2. model FLOP utilisation: 6 * N FLOPs per trained token (N = parameters that take part in a
   matrix multiply, i.e. all but the embedding lookups; attention's own FLOPs are not counted)
   divided by the float32 matrix-multiply peak measured in the same rounds;
3. greedy generation of 200 tokens from a 10-token prompt: ours with and without the KV cache,
   vs ``GPT2LMHeadModel.generate`` with its cache, all with the same weights (checked to give
   the same tokens).

Every timing is the median of interleaved rounds after a warm-up, each round timing several
steps, because this machine's speed drifts by +-15% from minute to minute (benchmarks/common.py).
``LLMS_QUICK=1`` shrinks everything to a smoke test.

Run: ``python benchmarks/model.py [--out benchmarks/results/model.json]``.
"""

from __future__ import annotations

import statistics
import tempfile

import torch
import torch.nn.functional as F
from common import (
    describe,
    environment,
    gpt2_small_or_toy,
    parse_args,
    ready,
    summary,
    time_interleaved,
    write_report,
)

from shared.generate import generate
from shared.model import GPTModel, check_config, count_parameters
from shared.utils import by_mode
from shared.weights import config_to_hf, load_hf_gpt2

# GPT-2 small, or a toy with a small vocabulary in quick mode.
CFG = gpt2_small_or_toy(vocab_size=1000, context_length=256)
BATCH, SEQ_LEN = by_mode(full=(2, 256), quick=(2, 32))
TRAIN_ROUNDS = by_mode(full=5, quick=1)
TRAIN_STEPS = by_mode(full=3, quick=1)  # single steps vary by +-30% here: time several per sample
GEN_ROUNDS = by_mode(full=3, quick=1)
PROMPT_LEN, NEW_TOKENS = by_mode(full=(10, 200), quick=(10, 8))
ADAMW = {"lr": 4e-4, "weight_decay": 0.1}  # identical for every model
MATMUL_SIZE = by_mode(full=2048, quick=256)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def hf_config(cfg, tie):
    """Hugging Face's GPT2Config for our config, through shared.weights' one translation."""
    from transformers import GPT2Config

    return GPT2Config.from_dict(config_to_hf(check_config({**cfg, "tie_weights": tie})))


def build_models():
    """name -> (model, returns_hf_output). Missing peers are skipped with a message."""
    models = {}
    torch.manual_seed(0)
    models["ours"] = (GPTModel(CFG), False)
    models["ours (tied)"] = (GPTModel({**CFG, "tie_weights": True}), False)
    try:
        from transformers import GPT2LMHeadModel

        models["hf"] = (GPT2LMHeadModel(hf_config(CFG, tie=False)), True)
        models["hf (tied)"] = (GPT2LMHeadModel(hf_config(CFG, tie=True)), True)
    except ImportError:
        print("transformers is not installed: skipping Hugging Face GPT-2")
    try:
        from llms_from_scratch.ch04 import GPTModel as RefGPTModel
        from llms_from_scratch.ch04 import GPTModelFast as RefGPTModelFast

        models["book GPTModel"] = (RefGPTModel(CFG), False)
        models["book GPTModelFast"] = (RefGPTModelFast(CFG), False)
    except ImportError:
        print("llms-from-scratch is not installed: skipping the book's reference models")
    return models


def matmul_params(model) -> int:
    """Parameters used in a matrix multiply: everything but the embedding lookups (the head counts)."""
    n = count_parameters(model)
    lookups = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    head = (
        model.get_output_embeddings()
        if hasattr(model, "get_output_embeddings")
        else getattr(model, "out_head", None)
    )
    for emb in lookups:
        if head is not None and emb.weight is head.weight:
            continue  # tied: the same matrix is the head's matmul
        n -= emb.weight.numel()
    return n


# ---------------------------------------------------------------------------------------
# Timed pieces
# ---------------------------------------------------------------------------------------


def make_batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, CFG["vocab_size"], (n, BATCH, SEQ_LEN + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def train_step(model, is_hf, optimizer, inputs, targets):
    out = model(inputs)
    logits = out.logits if is_hf else out
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def matmul_step():
    """A square float32 matrix multiply: the machine's matmul FLOP/s right now, for the MFU."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    return lambda: torch.mm(a, b)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def train_setup(model, is_hf, fused, batch):
    """Untimed: a fresh AdamW and one step to create its state; returns the timed step.

    Only one optimizer exists at a time (six GPT-2-small models with two AdamW states each
    would not fit in memory): it lives in the returned step and goes when the step does.
    """

    def setup():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=True if fused else None)
        train_step(model, is_hf, optimizer, *batch)
        return lambda: train_step(model, is_hf, optimizer, *batch)

    return setup


def benchmark_training(models):
    batch = make_batches(1)[0]
    candidates = {"matmul": matmul_step}
    for name, (model, is_hf) in models.items():
        for fused in (False, True):
            candidates[(name, fused)] = train_setup(model, is_hf, fused, batch)
    times = time_interleaved(candidates, TRAIN_ROUNDS, steps=TRAIN_STEPS)
    peaks = [2 * MATMUL_SIZE**3 / seconds for seconds in times.pop("matmul")]
    peak = statistics.median(peaks)
    rows = []
    for (name, fused), samples in times.items():
        model = models[name][0]
        speeds = [BATCH * SEQ_LEN / seconds for seconds in samples]
        tokens_per_s = statistics.median(speeds)
        n = matmul_params(model)
        rows.append(
            {
                "model": name,
                "adamw": "fused" if fused else "default",
                "params": count_parameters(model),
                "matmul_params": n,
                "tokens_per_s": tokens_per_s,
                "rounds": speeds,
                "mfu": 6 * n * tokens_per_s / peak,
            }
        )
    return rows, peak, peaks


def benchmark_generation(models):
    """Same weights everywhere: HF's untied model exported and loaded into ours."""
    prompt = torch.randint(0, CFG["vocab_size"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    rows = []
    if "hf" not in models:
        ours = models["ours"][0].eval()
        hf = None
    else:
        hf = models["hf"][0].eval()
        hf.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
        hf.generation_config.pad_token_id = 0
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            ours = load_hf_gpt2(folder)
    with torch.no_grad():
        reference = generate(ours, prompt, NEW_TOKENS, use_cache=True)
        assert torch.equal(reference, generate(ours, prompt, NEW_TOKENS, use_cache=False)), (
            "cache changed the tokens"
        )
        if hf is not None:
            out = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False
            )
            same = torch.equal(out, reference)
            print(f"  Hugging Face generate gives the same tokens: {same}")

    runners = {"ours (KV cache)": ready(lambda: generate(ours, prompt, NEW_TOKENS, use_cache=True))}
    if hf is not None:
        runners["hf generate (cache)"] = ready(
            lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        )
    with torch.no_grad():
        times = time_interleaved(runners, GEN_ROUNDS)
        # Without the cache every step recomputes the whole sequence: slow, so one round.
        no_cache = ready(lambda: generate(ours, prompt, NEW_TOKENS, use_cache=False))
        times.update(time_interleaved({"ours (no cache)": no_cache}, rounds=1, warmup_rounds=0))
    for name, samples in times.items():
        seconds = summary(samples)["median_s"]
        rows.append(
            {"model": name, "seconds": seconds, "tokens_per_s": NEW_TOKENS / seconds, "rounds": samples}
        )
    return rows, (same if hf is not None else None)


def ratio(a, b):
    return a / b if a and b else None


def show(value):
    return "-" if value is None else f"{value:.2f}x"


def main(argv=None):
    args = parse_args("model", __doc__.splitlines()[0], argv)
    record = environment()
    print(describe(record))
    models = build_models()
    train_rows, peak, peaks = benchmark_training(models)
    for name in ("book GPTModel", "book GPTModelFast", "ours (tied)", "hf (tied)"):
        models.pop(name, None)  # free memory; generation compares untied ours vs hf
    gen_rows, hf_same_tokens = benchmark_generation(models)

    by_key = {(r["model"], r["adamw"]): r for r in train_rows}
    print(
        f"\nTraining, batch {BATCH} x {SEQ_LEN}, float32, CPU; matmul peak {peak / 1e9:.1f} GFLOP/s (median)"
    )
    print("| model | AdamW | params | tokens/s | vs hf | vs book GPTModel | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in train_rows:
        hf_name = "hf (tied)" if "tied" in r["model"] else "hf"
        hf_row = by_key.get((hf_name, r["adamw"]))
        book_row = by_key.get(("book GPTModel", r["adamw"]))
        r["vs_hf"] = ratio(r["tokens_per_s"], hf_row["tokens_per_s"] if hf_row else None)
        r["vs_book"] = ratio(
            r["tokens_per_s"], book_row["tokens_per_s"] if book_row and "tied" not in r["model"] else None
        )
        print(
            f"| {r['model']} | {r['adamw']} | {r['params']:,} | {r['tokens_per_s']:.0f} | "
            f"{show(r['vs_hf'])} | {show(r['vs_book'])} | {r['mfu']:.2f} |"
        )

    gen_by = {r["model"]: r for r in gen_rows}
    print(f"\nGreedy generation, batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens")
    print("| run | seconds | tokens/s | vs hf generate |")
    print("|---|---:|---:|---:|")
    for r in gen_rows:
        hf_row = gen_by.get("hf generate (cache)")
        r["vs_hf"] = ratio(r["tokens_per_s"], hf_row["tokens_per_s"] if hf_row else None)
        print(f"| {r['model']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {show(r['vs_hf'])} |")

    results = {
        "config": CFG,
        "batch": [BATCH, SEQ_LEN],
        "adamw": ADAMW,
        "train_rounds": TRAIN_ROUNDS,
        "train_steps_per_sample": TRAIN_STEPS,
        "matmul_peak_flops": peak,
        "matmul_peak_rounds": peaks,
        "training": train_rows,
        "generation": {
            "prompt_tokens": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "hf_same_tokens": hf_same_tokens,
            "rows": gen_rows,
        },
    }
    write_report(args.out, "model", record, results)


if __name__ == "__main__":
    main()
