"""The GPT model, the final form built in ch04.

Token and position embeddings, a stack of pre-norm transformer blocks (attention and a
feed-forward network, each wrapped in a shortcut connection), a final norm and a linear
output head that turns each position's vector into logits over the vocabulary.

The layout follows GPT-2 piece for piece, so that its published weights load directly
(see :mod:`shared.weights`) and the logits match Hugging Face's ``GPT2LMHeadModel``.

Configuration is a plain dict with the book's keys (typed as :class:`GPTConfig`)::

    vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias

and three optional ones:

    tie_weights  (False) share one matrix between the token embedding and the output head,
                 as GPT-2 does;
    norm         ("layernorm") or "rmsnorm";
    norm_eps     (1e-5) the epsilon of every norm layer.

:func:`check_config` checks every value's type and range, so a typo such as ``emb_dim="32"``
or ``tie_weights="false"`` fails at once, naming the key, instead of deep inside torch or,
worse, building a different model than the one asked for.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, TypedDict

import torch
from torch import nn

from shared.attention import KVCache, MultiHeadAttention, padding_attention_mask
from shared.tokenizer import GPT2_VOCAB_SIZE, check_token_ids

# The four GPT-2 sizes. ``qkv_bias`` is False as in the book's ch04 model, which gives the
# parameter counts the chapter quotes (163,009,536 for gpt2-small); OpenAI's checkpoints do
# carry query/key/value biases, so ``shared.weights.load_hf_gpt2`` sets it to True.
_GPT2_BASE = {"vocab_size": GPT2_VOCAB_SIZE, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}
GPT_CONFIGS = {
    "gpt2-small": {**_GPT2_BASE, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2_BASE, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2_BASE, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2_BASE, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


class _RequiredGPTConfig(TypedDict):
    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float
    qkv_bias: bool


class GPTConfig(_RequiredGPTConfig, total=False):
    """The keys of a GPT config. Learners write plain dicts; this type documents them.

    The book's seven keys are required; the three below are optional (``total=False``, which
    works on Python 3.10, where ``typing.NotRequired`` does not exist yet).
    """

    tie_weights: bool
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps: float


REQUIRED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
OPTIONAL_KEYS = {"tie_weights": False, "norm": "layernorm", "norm_eps": 1e-5}
NORMS = ("layernorm", "rmsnorm")
_POSITIVE_INTS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
_BOOLS = ("qkv_bias", "tie_weights")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_values(cfg: GPTConfig) -> None:
    """Raise ValueError naming the first key whose value has the wrong type or range."""
    for key in _POSITIVE_INTS:
        if not _is_int(cfg[key]) or cfg[key] <= 0:
            raise ValueError(f"GPT config: {key} must be a positive integer, got {cfg[key]!r}.")
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            raise ValueError(
                f"GPT config: {key} must be True or False, got {cfg[key]!r}"
                + (" (a non-empty string counts as true)." if isinstance(cfg[key], str) else ".")
            )
    if not _is_real(cfg["drop_rate"]) or not 0 <= cfg["drop_rate"] < 1:
        raise ValueError(f"GPT config: drop_rate must be a number in [0, 1), got {cfg['drop_rate']!r}.")
    if not _is_real(cfg["norm_eps"]) or not 0 < cfg["norm_eps"] < math.inf:
        raise ValueError(f"GPT config: norm_eps must be a positive number, got {cfg['norm_eps']!r}.")
    if cfg["norm"] not in NORMS:
        raise ValueError(f"GPT config: norm must be one of {NORMS}, got {cfg['norm']!r}.")


def check_config(cfg: GPTConfig) -> GPTConfig:
    """Return ``cfg`` with the optional keys filled in; raise ValueError on a bad config.

    Missing and unknown keys are named, and so is every value of the wrong type or range.
    """
    if not isinstance(cfg, dict):
        raise ValueError(
            f"a GPT config is a dict with the keys {list(REQUIRED_KEYS)}, got {type(cfg).__name__}."
        )
    missing = [key for key in REQUIRED_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"GPT config is missing {missing}; it needs all of {list(REQUIRED_KEYS)}.")
    unknown = sorted(set(cfg) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(
            f"GPT config has unknown keys {unknown}; allowed are {list(REQUIRED_KEYS) + list(OPTIONAL_KEYS)}."
        )
    cfg = {**OPTIONAL_KEYS, **cfg}
    _check_values(cfg)
    if cfg["emb_dim"] % cfg["n_heads"] != 0:
        raise ValueError(
            f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']}): "
            "each head gets emb_dim // n_heads dimensions."
        )
    return cfg


def make_norm(cfg: GPTConfig) -> nn.Module:
    # torch's fused kernels; the ch04 notebook builds LayerNorm by hand and checks it matches.
    if cfg["norm"] == "rmsnorm":
        return nn.RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"])
    return nn.LayerNorm(cfg["emb_dim"], eps=cfg["norm_eps"])


class FeedForward(nn.Module):
    """Position-wise MLP: expand to 4x the width, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.fc = nn.Linear(emb_dim, 4 * emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * emb_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            dropout=cfg["drop_rate"],
            num_heads=cfg["n_heads"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.norm2 = make_norm(cfg)
        self.ff = FeedForward(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, **attention) -> torch.Tensor:
        """``attention``: the cache, attention mask and causal flag for :class:`MultiHeadAttention`."""
        x = x + self.drop_shortcut(self.att(self.norm1(x), **attention))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2-style decoder-only transformer: token ids (batch, tokens) -> logits (batch, tokens, vocab)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg = check_config(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.reset_parameters()
        if cfg["tie_weights"]:
            # One matrix maps ids to vectors and vectors back to logits (GPT-2 does this),
            # which saves vocab_size * emb_dim parameters.
            self.out_head.weight = self.tok_emb.weight

    @property
    def context_length(self) -> int:
        return self.cfg["context_length"]

    def reset_parameters(self, scheme: Literal["gpt2", "pytorch"] = "gpt2") -> None:
        """Draw fresh weights. ``scheme="gpt2"`` (what ``__init__`` uses) is GPT-2's initialisation:
        N(0, 0.02) weights, zero biases, unit norms; the projections that write into the residual
        stream get a std shrunk by 1/sqrt(2 * n_layers), so the stream's variance does not grow
        with depth.

        ``scheme="pytorch"`` gives every layer PyTorch's own default instead, which is what the
        book's model has because it never re-initialises: embeddings from N(0, 1), linear weights
        and biases uniform in +-1/sqrt(fan_in). It matters in ch05: with 0.02 embeddings the
        10-epoch run on The Verdict stalls near loss 6, with N(0, 1) embeddings it memorises the
        story as the book's run does (``ch05/initialisation.py`` measures both).
        """
        if scheme not in ("gpt2", "pytorch"):
            raise ValueError(f'scheme must be "gpt2" or "pytorch", got {scheme!r}.')
        residual_std = 0.02 / math.sqrt(2 * self.cfg["n_layers"])
        for name, module in self.named_modules():
            if scheme == "pytorch":
                # A tied head shares the embedding's matrix: keep the embedding's N(0, 1) for it.
                tied = module is self.out_head and self.out_head.weight is self.tok_emb.weight
                if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)) and not tied:
                    module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("att.out_proj", "ff.proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def new_cache(self) -> list[KVCache]:
        """An empty key/value cache, one per block, for :meth:`forward` (see shared.generate)."""
        return [KVCache(max_tokens=self.context_length) for _ in self.trf_blocks]

    def forward(
        self,
        idx: torch.Tensor,
        cache: list[KVCache] | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = True,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for token ids ``idx`` (batch, tokens).

        ``cache``: the blocks' key/value caches (see :meth:`new_cache`); ``idx`` then holds only
        the tokens after the cached ones.

        ``attention_mask`` (batch, cached + new tokens), 1 for real tokens and 0 for padding, is
        for padded sequences. No token attends to padding, and each row's positions count from its
        first real token: a row padded on the left (ch07 batches prompts of different lengths this
        way) computes exactly what it would alone, and a row padded on the right keeps positions
        0, 1, 2, ... Without a mask every position is real.

        ``causal=False`` lets every token attend to every real token, later ones included (ch06's
        bidirectional classifier); it needs no cache.

        ``last_only=True`` returns the logits of the last position only, (batch, 1, vocab): all
        that generation needs from a prompt. The output head is the model's widest layer, so
        skipping it for the other positions saves much of a long prompt's time.
        """
        if idx.ndim != 2:
            raise ValueError(
                f"expected token ids of shape (batch, tokens), got {tuple(idx.shape)}; "
                "add a batch dimension with idx.unsqueeze(0) for a single sequence."
            )
        # The range check reads the ids' min and max back to the host: free on a CPU, but on an
        # accelerator every forward pass would wait for the device, and training could no longer
        # queue the next step's work ahead. There the ids are checked before they get to the
        # device: by the datasets (shared.dataloader) and once per prompt by shared.generate.
        on_cpu = idx.device.type == "cpu"
        check_token_ids(idx, self.cfg["vocab_size"], check_range=on_cpu)
        num_tokens = idx.shape[1]
        # With a cache, the new tokens continue where the cached ones stopped.
        start = len(cache[0]) if cache else 0
        if start + num_tokens > self.context_length:
            raise ValueError(
                f"{start + num_tokens} tokens exceed the context length of {self.context_length}; "
                "crop the input to its last context_length tokens."
            )
        positions = torch.arange(start, start + num_tokens, device=idx.device)
        attn_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (idx.shape[0], start + num_tokens):
                raise ValueError(
                    f"attention_mask must have shape (batch, cached + new tokens) = "
                    f"{(idx.shape[0], start + num_tokens)}, got {tuple(attention_mask.shape)}."
                )
            real = attention_mask.to(device=idx.device, dtype=torch.bool)
            # A mask without padding changes nothing: drop it, so attention keeps its mask-free
            # kernels. (Asking is free on a CPU; an accelerator would have to report back.)
            if not (on_cpu and bool(real.all())):
                # Positions count from each row's first real token; left padding sits at position 0.
                first_real = real.int().argmax(dim=1, keepdim=True)
                positions = (positions - first_real).clamp(min=0)
                # One mask for all the blocks, built here once rather than in every block.
                attn_mask = padding_attention_mask(real, start, num_tokens, causal)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        for i, block in enumerate(self.trf_blocks):
            block_cache = cache[i] if cache else None
            x = block(x, cache=block_cache, attn_mask=attn_mask, causal=causal)
        if last_only:
            x = x[:, -1:, :]
        return self.out_head(self.final_norm(x))


def set_dropout(model: nn.Module, rate: float) -> nn.Module:
    """Set every dropout rate in ``model`` to ``rate`` and return the model.

    Dropout layers hold their probability in ``.p``; attention hands its rate to
    ``scaled_dot_product_attention`` and keeps it in ``.dropout``; the config records it too, so a
    checkpoint or an exported model says what was used. The book finetunes (ch06, ch07) with 0.
    """
    if not _is_real(rate) or not 0 <= rate < 1:
        raise ValueError(f"a dropout rate is a number in [0, 1), got {rate!r}.")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        elif isinstance(module, MultiHeadAttention):
            module.dropout = rate
    if isinstance(getattr(model, "cfg", None), dict):
        model.cfg["drop_rate"] = rate
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(cfg: GPTConfig) -> GPTModel:
    """A GPTModel whose tensors have shapes but no storage: free to build, for counting parameters."""
    with torch.device("meta"):
        return GPTModel(cfg)
