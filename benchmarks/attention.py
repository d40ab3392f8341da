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
outputs. Each time is the median over interleaved rounds after a warm-up, each round timing
several steps (benchmarks/common.py). Results go to a markdown table on stdout and to JSON
(``--out``, default ``benchmarks/results/attention.json``).
The same table is measured on CUDA when a GPU is present.
"""

from __future__ import annotations

import math
import statistics

import torch
from common import describe, environment, parse_args, time_interleaved, write_report
from torch import nn

from shared.attention import MultiHeadAttention
from shared.utils import by_mode

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


def forward_step(module: nn.Module, x: torch.Tensor):
    """Inference: eval mode, no autograd."""
    module.eval()

    def step():
        with torch.no_grad():
            module(x)

    return step


def forward_backward_step(module: nn.Module, x: torch.Tensor):
    """Training: train mode (dropout is 0), backpropagate the sum of the outputs."""
    module.train()

    def step():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return step


def benchmark(device: torch.device, batch, tokens, d_model, num_heads, rounds, steps) -> list[dict]:
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

    # Interleaved: each round runs every implementation in turn, so drift hits all alike. The
    # setups (untimed) put each module in eval or train mode right before its steps.
    candidates = {}
    for name, module in modules.items():
        candidates[(name, "forward")] = lambda module=module: forward_step(module, x)
        candidates[(name, "forward_backward")] = lambda module=module: forward_backward_step(module, x)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = time_interleaved(candidates, rounds, steps=steps, sync=sync)
    medians = {
        name: {kind: statistics.median(times[(name, kind)]) * 1e3 for kind in ("forward", "forward_backward")}
        for name in modules
    }
    reference = medians["shared (SDPA)"]
    return [
        {
            "name": name,
            "device": str(device),
            "forward_ms": m["forward"],
            "forward_backward_ms": m["forward_backward"],
            "forward_vs_shared": m["forward"] / reference["forward"],
            "forward_backward_vs_shared": m["forward_backward"] / reference["forward_backward"],
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


def main(argv=None) -> None:
    args = parse_args("attention", __doc__.splitlines()[0], argv)
    record = environment()
    config = {
        "batch": by_mode(full=8, quick=2),
        "tokens": by_mode(full=1024, quick=64),
        "d_model": by_mode(full=768, quick=96),
        "num_heads": 12,
        "rounds": by_mode(full=5, quick=2),
        "steps": by_mode(full=3, quick=2),
    }
    print(
        f"causal self-attention, batch {config['batch']} x {config['tokens']} tokens x "
        f"{config['d_model']} dims, {config['num_heads']} heads, float32; median of {config['rounds']} "
        f"interleaved rounds of {config['steps']} steps\n{describe(record)}"
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

    write_report(
        args.out, "attention", record, {"config": {**config, "dtype": "float32"}, "gpu": gpu, "results": rows}
    )


if __name__ == "__main__":
    main()
