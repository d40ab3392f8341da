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

    Each tensor has shape (batch, heads, tokens so far, head_dim).
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values; return those of all tokens so far."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat((self.keys, keys), dim=2)
            self.values = torch.cat((self.values, values), dim=2)
        return self.keys, self.values


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
    ) -> torch.Tensor:
        """Attend causally over ``x`` (batch, tokens, d_in), after the cached tokens if a cache is given.

        ``key_padding_mask`` (batch, cached + new tokens), True (or 1) for real tokens and False for
        padding, keeps every query away from padded keys. A padded query still sees itself, so
        its softmax is never empty (which would give NaN and spread through the cache).

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

        # (batch, tokens, 3 * d_out) -> 3 tensors of (batch, heads, tokens, head_dim)
        qkv = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            keys, values = cache.append(keys, values)

        dropout_p = self.dropout if self.training else 0.0
        if not causal:
            allowed = None
            if key_padding_mask is not None:
                allowed = self._padding_mask(key_padding_mask, batch, num_tokens, x.device)
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=allowed, dropout_p=dropout_p
            )
        elif key_padding_mask is not None:
            allowed = self._padded_causal_mask(key_padding_mask, batch, past, num_tokens, x.device)
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=allowed, dropout_p=dropout_p
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

    @staticmethod
    def _check_padding_mask(key_padding_mask, batch: int, total: int) -> None:
        if tuple(key_padding_mask.shape) != (batch, total):
            raise ValueError(
                f"key_padding_mask must have shape (batch, cached + new tokens) = {(batch, total)}, "
                f"got {tuple(key_padding_mask.shape)}."
            )

    def _padding_mask(self, key_padding_mask, batch, num_tokens, device) -> torch.Tensor:
        """(batch, 1, 1, keys) bool: every real key; a row without any real key keeps all its keys."""
        self._check_padding_mask(key_padding_mask, batch, num_tokens)
        real_keys = key_padding_mask.to(device=device, dtype=torch.bool)
        return (real_keys | ~real_keys.any(dim=1, keepdim=True))[:, None, None, :]

    def _padded_causal_mask(self, key_padding_mask, batch, past, num_tokens, device) -> torch.Tensor:
        """(batch, 1, queries, keys) bool: causal, no padded keys, but always the query's own key."""
        total = past + num_tokens
        self._check_padding_mask(key_padding_mask, batch, total)
        query_pos = torch.arange(past, total, device=device).unsqueeze(1)  # query i sits at past + i
        key_pos = torch.arange(total, device=device).unsqueeze(0)
        causal = key_pos <= query_pos
        itself = key_pos == query_pos
        real_keys = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        return causal & (real_keys | itself)
