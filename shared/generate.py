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
from shared.tokenizer import check_token_ids


def generate_text_simple(
    model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_length: int
) -> torch.Tensor:
    """The ch04 teaching version: greedy decoding, whole sequence recomputed every step."""
    for _ in range(max_new_tokens):
        window = idx[:, -context_length:]  # the model sees at most context_length tokens
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


def _check_arguments(model, idx, max_new_tokens, context_length, temperature, top_k, top_p, eos_id):
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(
            f"idx must be a (batch, tokens) tensor with at least one token, got shape {tuple(idx.shape)}."
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    limit = model.context_length
    if context_length is None:
        context_length = limit
    if not 1 <= context_length <= limit:
        raise ValueError(
            f"context_length must be between 1 and the model's context length {limit}, got {context_length}."
        )
    _check_sampling(temperature, top_k, top_p)
    vocab_size = model.cfg["vocab_size"]
    check_token_ids(idx, vocab_size, "prompt token ids")  # once per call, wherever idx lives
    if eos_id is not None and not (isinstance(eos_id, numbers.Integral) and 0 <= eos_id < vocab_size):
        raise ValueError(
            f"eos_id must be a token id from 0 to {vocab_size - 1} (the model's vocabulary), got {eos_id!r}; "
            "an id the model can never produce would never stop generation."
        )
    return context_length


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
    context_length: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend each row of ``idx`` (batch, tokens) by up to ``max_new_tokens`` ids; return (batch, tokens + n).

    - The model sees at most ``context_length`` tokens (default: its context length); longer
      sequences are cropped to their last ``context_length`` tokens.
    - ``temperature=0`` is greedy decoding; see :func:`next_token` for sampling.
    - ``eos_id`` (an id of the model's vocabulary): once a row produces it, that row is finished. The eos token is kept, and every
      later position of a finished row is filled with ``eos_id`` (so the batch stays
      rectangular); generation stops early when every row has finished. For one row this
      means the output ends with ``eos_id`` when it was produced.
    - ``use_cache=True`` feeds only the newest token each step, reusing the cached keys and
      values. Positions are absolute, so once the sequence outgrows ``context_length`` a cache
      cannot slide along with the window; from then on each step recomputes the window, exactly
      as without the cache. The tokens are the same either way.

    The model's mode is left as it is: call ``model.eval()`` first (dropout would make every
    run, cached or not, different).

    Every row of ``idx`` has the same length, and every token in it is read as text: there is
    no padding mask. So prompts of different lengths cannot simply be padded into one batch
    (the padding would change what the model sees). Generate them one at a time (a batch of
    one each) or group prompts of equal length; ch07 adds padding-aware batching.
    """
    context_length = _check_arguments(
        model, idx, max_new_tokens, context_length, temperature, top_k, top_p, eos_id
    )
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    for _ in range(max_new_tokens):
        if use_cache and idx.shape[1] <= context_length:
            if cache is None:  # first step: run the whole prompt and fill the cache
                cache = model.new_cache()
                logits = model(idx, cache=cache, last_only=True)
            else:  # later steps: only the token added last
                logits = model(idx[:, -1:], cache=cache)
        else:
            cache = None  # the window slides: recompute it whole
            logits = model(idx[:, -context_length:], last_only=True)

        next_id = next_token(logits[:, -1, :], temperature, top_k, top_p)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat((idx, next_id), dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx


@torch.no_grad()
def sequence_logprob(model: GPTModel, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Total log-probability the model gives the tokens after the first ``prompt_length`` of each row.

    ``ids`` is (batch, tokens) with tokens <= the context length; returns (batch,) sums of
    log p(token | everything before it). Useful to compare decoders: a higher (less negative)
    value means the model finds the continuation more likely.
    """
    if not 1 <= prompt_length < ids.shape[1]:
        raise ValueError(
            f"prompt_length must be between 1 and the sequence length - 1 ({ids.shape[1] - 1}), got {prompt_length}."
        )
    logprobs = model(ids[:, :-1]).log_softmax(dim=-1)  # position i predicts token i + 1
    targets = ids[:, 1:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked[:, prompt_length - 1 :].sum(dim=-1)


def _reorder_cache(cache, beam_index: torch.Tensor) -> None:
    # Each surviving beam continues one of the previous beams: give it that beam's keys and values.
    for layer in cache:
        layer.replace(layer.keys.index_select(0, beam_index), layer.values.index_select(0, beam_index))


@torch.no_grad()
def beam_search(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    beam_width: int,
    context_length: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Beam search for one prompt ``idx`` of shape (1, tokens); returns (1, tokens + n) ids, n <= max_new_tokens.

    Greedy decoding keeps the single most likely token at every step; beam search keeps the
    ``beam_width`` most likely *sequences* so far (by summed log-probability), extends each by
    every token, and keeps the best ``beam_width`` of all those extensions.

    - A beam that produces ``eos_id`` is finished (the eos token is kept) and leaves the beam,
      which then continues with one fewer sequence; the search stops when no beam is left or
      after ``max_new_tokens`` steps. So with ``beam_width=1`` this is exactly greedy decoding.
    - The winner is the finished or surviving sequence with the best mean log-probability per
      new token (the raw sum would favour short sequences, since every token adds a negative
      term). Without ``eos_id`` every candidate has the same length, so this is the best sum.
    - ``context_length`` and the cache behave as in :func:`generate`.

    Beam search usually finds a continuation with a higher log-probability than greedy
    decoding, but not always: the greedy sequence can fall out of the beam at an early step
    and the beams kept instead may end lower. Higher likelihood is also not the same as better
    text: for open-ended generation it tends to repeat itself (see the ch05 notebook).
    Call ``model.eval()`` first.
    """
    context_length = _check_arguments(model, idx, max_new_tokens, context_length, 0.0, None, None, eos_id)
    if idx.shape[0] != 1:
        raise ValueError(
            f"beam_search decodes one prompt at a time: idx must have shape (1, tokens), got {tuple(idx.shape)}."
        )
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}.")

    beams = idx  # (beams alive, tokens so far)
    scores = torch.zeros(1, device=idx.device)  # summed log-probs of each alive beam's new tokens
    finished: list[tuple[float, torch.Tensor]] = []  # (mean log-prob per new token, ids)
    cache = None
    steps_done = 0
    for step in range(max_new_tokens):
        if use_cache and beams.shape[1] <= context_length:
            if cache is None:
                cache = model.new_cache()
                logits = model(beams, cache=cache, last_only=True)
            else:
                logits = model(beams[:, -1:], cache=cache)
        else:
            cache = None
            logits = model(beams[:, -context_length:], last_only=True)
        logprobs = logits[:, -1, :].float().log_softmax(dim=-1)  # (beams, vocab)

        # Every (beam, token) extension, scored by the beam's total plus the token's log-prob.
        candidates = (scores.unsqueeze(1) + logprobs).flatten()
        width = min(beam_width, candidates.numel())
        top_scores, flat_index = torch.topk(candidates, width)
        vocab = logprobs.shape[-1]
        beam_index, token = flat_index // vocab, flat_index % vocab
        beams = torch.cat((beams.index_select(0, beam_index), token.unsqueeze(1)), dim=1)
        scores = top_scores
        steps_done = step + 1
        if cache is not None:
            _reorder_cache(cache, beam_index)

        if eos_id is not None:
            done = token == eos_id
            for row in done.nonzero().flatten().tolist():
                finished.append((float(scores[row]) / steps_done, beams[row : row + 1]))
            if bool(done.any()):
                keep = (~done).nonzero().flatten()
                beams, scores = beams.index_select(0, keep), scores.index_select(0, keep)
                if cache is not None:
                    _reorder_cache(cache, keep)
            if beams.shape[0] == 0:
                break

    if steps_done == 0:
        return idx
    alive = [
        (float(scores[row]) / steps_done, beams[row : row + 1])
        for row in range(beams.shape[0])
    ]
    # max() keeps the first of equal scores: alive beams come in descending order of score.
    return max(finished + alive, key=lambda item: item[0])[1]
