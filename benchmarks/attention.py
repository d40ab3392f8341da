"""Speed of four ways to compute the same causal multi-head self-attention.

    python benchmarks/attention.py              # batch 8 x 1,024 tokens x 768 dims, 12 heads
    LLMS_QUICK=1 python benchmarks/attention.py # toy sizes, a few seconds

Implementations, all holding the same weights (checked to give the same outputs first):

- single-head wrapper (baseline): one causal head per module, run one after another, outputs
  concatenated, then an output projection; the ch03 teaching version.
- split heads, explicit mask (baseline): one projection per q/k/v split into heads, scores masked
  with a stored upper-triangular mask, softmax, weights @ values; the ch03 teaching version.
- shared (SDPA): ``shared.attention.MultiHeadAttention``, fused qkv and
  ``F.scaled_dot_product_attention(is_causal=True)``.
- torch.nn.MultiheadAttention: PyTorch's own module with a causal mask, as it runs by default,
  and once more with its inference fast path switched off (this changes only the forward row).

"forward" runs in eval mode under ``torch.no_grad()`` (inference); "forward+backward" runs in
training mode (dropout 0, so only attention is measured) and backpropagates a sum of the
outputs. Each time is the median over interleaved rounds after a warm-up. Results go to a
markdown table on stdout and to JSON (``--out``, default ``benchmarks/results/attention.json``).
The same table is measured on CUDA when a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from shared.attention import MultiHeadAttention
from shared.utils import by_mode, is_quick

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "attention.json"


# --- baselines: compact copies of the ch03 teaching versions --------------------------------


class BaselineCausalHead(nn.Module):
    """Baseline: one causal attention head with its own q/k/v projections and a stored mask."""

    def __init__(self, d_in, head_dim, context_length):
        super().__init__()
        self.query = nn.Linear(d_in, head_dim, bias=False)
        self.key = nn.Linear(d_in, head_dim, bias=False)
        self.value = nn.Linear(d_in, head_dim, bias=False)
        self.register_buffer("future", torch.ones(context_length, context_length).triu(1).bool())

    def forward(self, x):
        tokens = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = (q @ k.transpose(1, 2)).masked_fill(self.future[:tokens, :tokens], float("-inf"))
        return torch.softmax(scores / math.sqrt(k.shape[-1]), dim=-1) @ v


class BaselineHeadsWrapper(nn.Module):
    """Baseline: independent single heads, concatenated, then an output projection."""

    def __init__(self, d_in, d_out, context_length, num_heads):
        super().__init__()
        head_dim = d_out // num_heads
        self.heads = nn.ModuleList(
            BaselineCausalHead(d_in, head_dim, context_length) for _ in range(num_heads)
        )
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.out_proj(torch.cat([head(x) for head in self.heads], dim=-1))


class BaselineSplitHeads(nn.Module):
    """Baseline: one projection each for q/k/v, split into heads, explicit mask and softmax."""

    def __init__(self, d_in, d_out, context_length, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.query = nn.Linear(d_in, d_out, bias=False)
        self.key = nn.Linear(d_in, d_out, bias=False)
        self.value = nn.Linear(d_in, d_out, bias=False)
        self.out_proj = nn.Linear(d_out, d_out)
        self.register_buffer("future", torch.ones(context_length, context_length).triu(1).bool())

    def forward(self, x):
        batch, tokens, _ = x.shape

        def split(t):  # (batch, tokens, d_out) -> (batch, heads, tokens, head_dim)
            return t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.future[:tokens, :tokens], float("-inf"))
        context = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1) @ v
        return self.out_proj(context.transpose(1, 2).reshape(batch, tokens, -1))


class TorchMultiheadAttention(nn.Module):
    """Peer: torch.nn.MultiheadAttention called as causal self-attention on (batch, tokens, d).

    With ``fastpath=False`` its inference "fast path" (a native kernel it takes in eval mode
    under no_grad) is switched off for the call, so inference runs the same code as training.
    """

    def __init__(self, d_model, context_length, num_heads, fastpath=True):
        super().__init__()
        self.fastpath = fastpath
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=0.0, bias=True, batch_first=True)
        self.register_buffer("future", torch.ones(context_length, context_length).triu(1).bool())

    def forward(self, x):
        tokens = x.shape[1]
        mask = self.future[:tokens, :tokens]
        was_enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(self.fastpath)
        try:
            return self.attention(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]
        finally:
            torch.backends.mha.set_fastpath_enabled(was_enabled)


@torch.no_grad()
def copy_weights_from(shared: MultiHeadAttention, wrapper, split, peers) -> None:
    """Give every implementation shared's weights (shared has no qkv bias, so the peers get zeros)."""
    w_q, w_k, w_v = shared.qkv.weight.chunk(3, dim=0)
    for target in (wrapper, split, *(peer.attention for peer in peers)):
        target.out_proj.load_state_dict(shared.out_proj.state_dict())
    for i, head in enumerate(wrapper.heads):
        rows = slice(i * shared.head_dim, (i + 1) * shared.head_dim)
        head.query.weight.copy_(w_q[rows])
        head.key.weight.copy_(w_k[rows])
        head.value.weight.copy_(w_v[rows])
    split.query.weight.copy_(w_q)
    split.key.weight.copy_(w_k)
    split.value.weight.copy_(w_v)
    for peer in peers:
        peer.attention.in_proj_weight.copy_(shared.qkv.weight)
        peer.attention.in_proj_bias.zero_()


# --- timing ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(module: nn.Module, x: torch.Tensor) -> float:
    module.eval()
    sync(x.device)
    start = time.perf_counter()
    with torch.no_grad():
        module(x)
    sync(x.device)
    return time.perf_counter() - start


def time_forward_backward(module: nn.Module, x: torch.Tensor) -> float:
    module.train()
    module.zero_grad(set_to_none=True)
    sync(x.device)
    start = time.perf_counter()
    module(x).sum().backward()
    sync(x.device)
    return time.perf_counter() - start


def benchmark(device: torch.device, batch, tokens, d_model, num_heads, rounds) -> list[dict]:
    torch.manual_seed(123)
    shared = MultiHeadAttention(d_model, d_model, tokens, dropout=0.0, num_heads=num_heads)
    wrapper = BaselineHeadsWrapper(d_model, d_model, tokens, num_heads)
    split = BaselineSplitHeads(d_model, d_model, tokens, num_heads)
    peer = TorchMultiheadAttention(d_model, tokens, num_heads)
    peer_no_fastpath = TorchMultiheadAttention(d_model, tokens, num_heads, fastpath=False)
    copy_weights_from(shared, wrapper, split, (peer, peer_no_fastpath))
    modules = {
        "single-head wrapper": wrapper,
        "split heads, explicit mask": split,
        "shared (SDPA)": shared,
        "torch.nn.MultiheadAttention": peer,
        "torch.nn.MultiheadAttention, fast path off": peer_no_fastpath,
    }
    for module in modules.values():
        module.to(device)
    x = torch.randn(batch, tokens, d_model, device=device)

    # Same function, same weights: the outputs must agree before their speed means anything.
    with torch.no_grad():
        expected = shared.eval()(x)
        for name, module in modules.items():
            error = (module.eval()(x) - expected).abs().max().item()
            if error > 1e-4:
                raise RuntimeError(f"{name} differs from shared (SDPA) by {error:.2e}; not timing it")

    times = {name: {"forward": [], "forward_backward": []} for name in modules}
    for round_index in range(rounds + 1):  # round 0 is the warm-up, not recorded
        for name, module in modules.items():  # interleaved, so drift hits all alike
            forward, forward_backward = time_forward(module, x), time_forward_backward(module, x)
            if round_index > 0:
                times[name]["forward"].append(forward)
                times[name]["forward_backward"].append(forward_backward)

    medians = {
        name: {kind: statistics.median(ts) * 1e3 for kind, ts in t.items()} for name, t in times.items()
    }
    reference = medians["shared (SDPA)"]
    return [
        {
            "name": name,
            "device": str(device),
            "forward_ms": round(m["forward"], 2),
            "forward_backward_ms": round(m["forward_backward"], 2),
            "forward_vs_shared": round(m["forward"] / reference["forward"], 2),
            "forward_backward_vs_shared": round(m["forward_backward"] / reference["forward_backward"], 2),
        }
        for name, m in medians.items()
    ]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| implementation | device | forward (ms) | vs shared | forward+backward (ms) | vs shared |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['device']} | {r['forward_ms']:.1f} | {r['forward_vs_shared']:.2f}x "
            f"| {r['forward_backward_ms']:.1f} | {r['forward_backward_vs_shared']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = parser.parse_args()

    config = {
        "batch": by_mode(full=8, quick=2),
        "tokens": by_mode(full=1024, quick=64),
        "d_model": by_mode(full=768, quick=96),
        "num_heads": 12,
        "rounds": by_mode(full=5, quick=2),
    }
    print(
        f"causal self-attention, batch {config['batch']} x {config['tokens']} tokens x "
        f"{config['d_model']} dims, {config['num_heads']} heads, float32; median of {config['rounds']} "
        f"interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )

    rows = benchmark(torch.device("cpu"), **config)
    print("\nCPU\n" + markdown_table(rows))
    if torch.cuda.is_available():
        gpu = {"available": True, "name": torch.cuda.get_device_name()}
        gpu_rows = benchmark(torch.device("cuda"), **config)
        print(f"\nGPU ({gpu['name']})\n" + markdown_table(gpu_rows))
        rows += gpu_rows
    else:
        gpu = {"available": False, "note": "no GPU was available for this run; no GPU table measured"}
        print(f"\nGPU: {gpu['note']}")

    report = {
        "benchmark": "attention",
        "config": {**config, "quick": is_quick(), "dtype": "float32"},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "gpu": gpu,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
