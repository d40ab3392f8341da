"""Causal multi-head self-attention, the final form built in ch03.

One fused linear layer projects the input to queries, keys and values at once, the heads are
split out of it, and ``torch.nn.functional.scaled_dot_product_attention`` does the masked
softmax(QK^T / sqrt(d_head)) V with the fastest kernel available, never materialising a mask
for the usual causal case.

The layer also takes an optional :class:`KVCache`, so that generation (ch04) feeds only the
new tokens and reuses the keys and values of the earlier ones, and an optional key padding
mask, so that prompts of different lengths can share a batch when they are padded on the left
(ch07's batched response generation). Without a padding mask nothing changes: the usual case
stays on SDPA's mask-free causal kernel. ``causal=False`` lets every token attend to every
(real) token, as a bidirectional encoder does (ch06 tries it for classification).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of the tokens one attention layer has already seen.

    ``keys`` and ``values`` have shape (batch, heads, tokens so far, head_dim).

    Why the buffers: appending with ``torch.cat`` would allocate a new tensor and copy every
    cached key and value at each generated token. Instead the cache keeps buffers with room to
    spare and writes the new tokens into them in place; ``keys`` and ``values`` are views of the
    filled part. A full buffer doubles (up to ``max_tokens``), so the copies are few.
    """

    def __init__(self, max_tokens: int | None = None):
        self.max_tokens = max_tokens  # the model's context length: a position past it has no embedding
        self._keys: torch.Tensor | None = None  # buffers (batch, heads, room, head_dim)
        self._values: torch.Tensor | None = None
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self._length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, : self._length]

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys`` and ``values`` instead (beam search reorders rows, the server merges batches)."""
        if keys.shape[2] != values.shape[2]:
            raise ValueError(
                f"keys and values must hold as many tokens, got {keys.shape[2]} and {values.shape[2]}."
            )
        self._keys, self._values, self._length = keys, values, keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values; return those of all tokens so far."""
        start, end = self._length, self._length + keys.shape[2]
        if self.max_tokens is not None and end > self.max_tokens:
            raise ValueError(
                f"the cache holds at most {self.max_tokens} tokens (the context length), and "
                f"{end} would not fit; start a new cache or crop the sequence."
            )
        if self._keys is None or end > self._keys.shape[2]:
            self._grow(keys, values, room=end * 2)
        self._keys[:, :, start:end] = keys
        self._values[:, :, start:end] = values
        self._length = end
        return self.keys, self.values

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """New buffers with ``room`` tokens (at most ``max_tokens``), the cached tokens copied in."""
        if self.max_tokens is not None:
            room = min(room, self.max_tokens)
        old_keys, old_values = self.keys, self.values
        batch, heads, _, head_dim = keys.shape
        self._keys = keys.new_empty(batch, heads, room, head_dim)
        self._values = values.new_empty(batch, heads, room, values.shape[3])
        if old_keys is not None:
            self._keys[:, :, : self._length] = old_keys
            self._values[:, :, : self._length] = old_values


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention on (batch, tokens, d_in) inputs.

    Parameter names match GPT-2's layout so that its weights map on directly:
    ``qkv`` is GPT-2's ``c_attn`` (queries, keys, values stacked in that order) and
    ``out_proj`` is its ``c_proj``.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(
                f"d_out ({d_out}) must be divisible by num_heads ({num_heads}): "
                "each head gets d_out // num_heads dimensions."
            )
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.dropout = dropout
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = True,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend causally over ``x`` (batch, tokens, d_in), after the cached tokens if a cache is given.

        ``key_padding_mask`` (batch, cached + new tokens), True (or 1) for real tokens and False for
        padding, keeps every query away from padded keys (see :func:`padding_attention_mask`).

        ``attn_mask``: the mask :func:`padding_attention_mask` builds, given instead of
        ``key_padding_mask``, so that a model builds it once for all its layers.

        ``causal=False`` drops the causal mask: every query sees every real key (all keys when a
        row has no real token at all). It takes whole sequences, so no cache.
        """
        if x.ndim != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(
                f"expected input of shape (batch, tokens, {self.qkv.in_features}), got {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single sequence."
            )
        batch, num_tokens, _ = x.shape
        past = len(cache) if cache is not None else 0
        if not causal and cache is not None:
            raise ValueError(
                "causal=False attends over whole sequences and takes no cache; a cache is for "
                "generation, which is causal."
            )
        if past + num_tokens > self.context_length:
            raise ValueError(
                f"{past + num_tokens} tokens exceed the context length of {self.context_length}; "
                "crop the input to the last context_length tokens."
            )
        if key_padding_mask is not None:
            if attn_mask is not None:
                raise ValueError("give key_padding_mask or attn_mask (built from it), not both.")
            _check_padding_mask(key_padding_mask, batch, past + num_tokens)
            attn_mask = padding_attention_mask(key_padding_mask.to(x.device), past, num_tokens, causal)

        # (batch, tokens, 3 * d_out) -> 3 tensors of (batch, heads, tokens, head_dim)
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            keys, values = cache.append(keys, values)

        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is not None or not causal:
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=attn_mask, dropout_p=dropout_p
            )
        elif past == 0:
            # Square causal attention: SDPA builds the mask itself (or needs none at all).
            context = F.scaled_dot_product_attention(
                queries, keys, values, dropout_p=dropout_p, is_causal=True
            )
        elif num_tokens == 1:
            # One new token may look at every cached token: no mask needed.
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        else:
            # Several new tokens after cached ones: query i sits at position past + i.
            allowed = torch.ones(num_tokens, past + num_tokens, dtype=torch.bool, device=x.device).tril(past)
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=allowed, dropout_p=dropout_p
            )

        context = context.transpose(1, 2).reshape(batch, num_tokens, self.d_out)
        return self.out_proj(context)


def _check_padding_mask(key_padding_mask, batch: int, total: int) -> None:
    if tuple(key_padding_mask.shape) != (batch, total):
        raise ValueError(
            f"key_padding_mask must have shape (batch, cached + new tokens) = {(batch, total)}, "
            f"got {tuple(key_padding_mask.shape)}."
        )


def padding_attention_mask(
    key_padding_mask: torch.Tensor, past: int, num_tokens: int, causal: bool = True
) -> torch.Tensor:
    """Which keys each new token may attend to when some tokens are padding: (batch, 1, queries, keys) bool.

    ``key_padding_mask`` (batch, past + num_tokens) is True (or 1) for real tokens; the queries
    are the last ``num_tokens`` of them. Causal: no query sees a later key or a padded one, but
    each always sees its own key, so a padded query's softmax is never empty (which would give
    NaN and spread through the cache). Not causal: every real key, and all keys for a row
    without any real token.
    """
    real_keys = key_padding_mask.to(torch.bool)[:, None, None, :]
    if not causal:
        return real_keys | ~real_keys.any(dim=-1, keepdim=True)
    total = past + num_tokens
    query_pos = torch.arange(past, total, device=real_keys.device).unsqueeze(1)  # query i sits at past + i
    key_pos = torch.arange(total, device=real_keys.device).unsqueeze(0)
    return (key_pos <= query_pos) & (real_keys | (key_pos == query_pos))
