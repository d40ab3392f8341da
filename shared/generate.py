"""Text generation with a GPTModel: greedy or sampled, with a key/value cache.

Autoregressive generation appends one token at a time, each chosen from the logits at the
last position. Without a cache every step runs the whole (cropped) sequence through the model
again; with the cache each step feeds only the newest token and the attention layers reuse
the keys and values they computed for the earlier ones. Both give the same tokens.
"""

from __future__ import annotations

import math
import numbers

import torch

from shared.model import GPTModel


def generate_text_simple(
    model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """The ch04 teaching version: greedy decoding, whole sequence recomputed every step."""
    for _ in range(max_new_tokens):
        window = idx[:, -context_size:]  # the model sees at most context_size tokens
        with torch.no_grad():
            logits = model(window)
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (batch, 1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling settings :func:`next_token` and :func:`generate` accept."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}.")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}.")


def _check_arguments(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id):
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(
            f"idx must be a (batch, tokens) tensor with at least one token, got shape {tuple(idx.shape)}."
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    limit = model.context_length
    if context_size is None:
        context_size = limit
    if not 1 <= context_size <= limit:
        raise ValueError(
            f"context_size must be between 1 and the model's context length {limit}, got {context_size}."
        )
    _check_sampling(temperature, top_k, top_p)
    vocab_size = model.cfg["vocab_size"]
    if eos_id is not None and not (isinstance(eos_id, numbers.Integral) and 0 <= eos_id < vocab_size):
        raise ValueError(
            f"eos_id must be a token id from 0 to {vocab_size - 1} (the model's vocabulary), got {eos_id!r}; "
            "an id the model can never produce would never stop generation."
        )
    return context_size


def next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Pick the next token id for each row of ``logits`` (batch, vocab); returns (batch, 1).

    temperature 0 takes the argmax. Otherwise the logits are divided by the temperature,
    cut to the ``top_k`` largest and then to the smallest set whose probability reaches
    ``top_p`` (nucleus sampling), and one token is sampled. Bad settings (a negative or NaN
    temperature, ``top_k < 1``, ``top_p`` outside (0, 1]) raise ValueError, as in :func:`generate`.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones ranked above it already reach top_p (the top one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1)


@torch.no_grad()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend each row of ``idx`` (batch, tokens) by up to ``max_new_tokens`` ids; return (batch, tokens + n).

    - The model sees at most ``context_size`` tokens (default: its context length); longer
      sequences are cropped to their last ``context_size`` tokens.
    - ``temperature=0`` is greedy decoding; see :func:`next_token` for sampling.
    - ``eos_id`` (an id of the model's vocabulary): once a row produces it, that row is finished. The eos token is kept, and every
      later position of a finished row is filled with ``eos_id`` (so the batch stays
      rectangular); generation stops early when every row has finished. For one row this
      means the output ends with ``eos_id`` when it was produced.
    - ``use_cache=True`` feeds only the newest token each step, reusing the cached keys and
      values. Positions are absolute, so once the sequence outgrows ``context_size`` a cache
      cannot slide along with the window; from then on each step recomputes the window, exactly
      as without the cache. The tokens are the same either way.

    The model's mode is left as it is: call ``model.eval()`` first (dropout would make every
    run, cached or not, different).

    Every row of ``idx`` has the same length, and every token in it is read as text: there is
    no padding mask. So prompts of different lengths cannot simply be padded into one batch
    (the padding would change what the model sees). Generate them one at a time (a batch of
    one each) or group prompts of equal length; ch07 adds padding-aware batching.
    """
    context_size = _check_arguments(
        model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id
    )
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    for _ in range(max_new_tokens):
        if use_cache and idx.shape[1] <= context_size:
            if cache is None:  # first step: run the whole prompt and fill the cache
                cache = model.new_cache()
                logits = model(idx, cache=cache)
            else:  # later steps: only the token added last
                logits = model(idx[:, -1:], cache=cache)
        else:
            cache = None  # the window slides: recompute it whole
            logits = model(idx[:, -context_size:])

        next_id = next_token(logits[:, -1, :], temperature, top_k, top_p)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat((idx, next_id), dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx
