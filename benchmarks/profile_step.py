"""Where one ch05 training step spends its time on this machine, and what the matrix products reach.

Backs the analysis in ch05/README.md of why a float32 loop cannot be much faster than the
book's on a CPU: the step's matrix products run at the rate a lone product of the same shape
reaches, and both sides do the same products.

- **profile**: one training step of GPT-2 small (context 256, batch 2, dropout 0.1; forward,
  backward and a fused AdamW step through ``shared.train``), in float32, under
  ``torch.profiler``: each op's share of the step's self time, the matrix products'
  (``mm``, ``addmm``, ``bmm``) share, and their GFLOP/s (the step's 6 x parameters x tokens
  flops for the linear layers over the products' time).
- **matmul**: a lone (512 x 768) @ (768 x 3072) product, the feed-forward layer's shape for one
  batch, in float32 and bfloat16: median GFLOP/s over interleaved rounds.

``--quick`` (or ``LLMS_QUICK=1``) shrinks the model for a smoke run. Writes profile_step.json
into a new folder under benchmarks/runs/ (``--out-dir`` to choose one, ``--refresh-committed``
to replace benchmarks/results/profile_step.json). The profile reads CPU kernel times, so
``--device`` accepts only ``cpu``.
"""

from __future__ import annotations

import statistics

import torch
from common import describe, environment, parse_run_args, ready, time_interleaved, write_report
from torch.profiler import ProfilerActivity, profile

from shared.model import GPT_CONFIGS, GPTModel
from shared.train import calc_loss_batch, make_optimizer
from shared.utils import by_mode

CFG = by_mode(
    full={**GPT_CONFIGS["gpt2-small"], "context_length": 256},
    quick={**GPT_CONFIGS["gpt2-small"], "context_length": 64, "emb_dim": 64, "n_heads": 2, "n_layers": 1},
)
BATCH = 2
WARMUP_STEPS = by_mode(full=2, quick=1)
MATMUL = by_mode(full=(512, 768, 3072), quick=(128, 64, 256))
ROUNDS = by_mode(full=5, quick=2)
MATRIX_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_step() -> dict:
    torch.manual_seed(0)
    model = GPTModel(CFG).train()
    optimizer = make_optimizer(model, 4e-4, 0.1)
    tokens = BATCH * CFG["context_length"]
    inputs = torch.randint(0, CFG["vocab_size"], (BATCH, CFG["context_length"]))
    targets = torch.randint(0, CFG["vocab_size"], (BATCH, CFG["context_length"]))

    def step():
        optimizer.zero_grad(set_to_none=True)
        calc_loss_batch(inputs, targets, model, "cpu").backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {event.key: event.self_cpu_time_total for event in prof.key_averages()}  # microseconds
    total = sum(ops.values())
    matrix_s = sum(ops.get(name, 0) for name in MATRIX_OPS) / 1e6
    # Linear layers (blocks and head; embeddings are lookups): 2 flops per weight and token
    # forward, 4 backward.
    linear_weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "emb" not in n)
    top = sorted(ops.items(), key=lambda item: -item[1])[:12]
    return {
        "step_s": total / 1e6,
        "matrix_products_share": matrix_s * 1e6 / total,
        "matrix_products_gflops": 6 * linear_weights * tokens / matrix_s / 1e9,
        "top_ops_share": {name: micros / total for name, micros in top},
    }


def matmul_rates() -> dict:
    m, k, n = MATMUL
    operands = {
        dtype: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
        for dtype in (torch.float32, torch.bfloat16)
    }
    samples = time_interleaved(
        {str(dtype).removeprefix("torch."): ready(lambda a=a, b=b: a @ b) for dtype, (a, b) in operands.items()},
        rounds=ROUNDS,
        steps=10,
    )
    flops = 2 * m * k * n
    return {
        "shape": [m, k, n],
        "gflops": {name: flops / statistics.median(s) / 1e9 for name, s in samples.items()},
    }


def main(argv=None) -> None:
    args = parse_run_args("profile_step", __doc__.splitlines()[0], argv)
    if torch.device(args.device).type != "cpu":
        raise SystemExit(f"error: --device {args.device}: this profile reads CPU kernel times; use --device cpu.")
    record = environment()
    print(describe(record), flush=True)
    step = profile_step()
    rates = matmul_rates()
    print(f"one training step: {step['step_s']:.2f} s, matrix products {step['matrix_products_share']:.0%} "
          f"of it at {step['matrix_products_gflops']:.0f} GFLOP/s")  # fmt: skip
    for name, share in step["top_ops_share"].items():
        print(f"  {share:6.1%}  {name}")
    print(f"lone {' x '.join(map(str, rates['shape']))} product: "
          + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in rates["gflops"].items()))  # fmt: skip
    write_report(args.out, "profile_step", record, {"config": CFG, "batch": BATCH, "step": step, "matmul": rates})


if __name__ == "__main__":
    main()
