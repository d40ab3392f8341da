"""Serving many generation requests at once: continuous batching with the key/value cache.

A server that answers one request at a time leaves most of the hardware idle: a decode step
for one row costs almost as much as for eight, because the weights are read once either way.
:class:`BatchingEngine` therefore keeps one running batch and, on its own thread, repeats:

1. admit: waiting requests (up to ``max_batch`` rows in all) are padded on the left into a
   small batch, run through the model once (the prefill fills their key/value cache), and
   merged into the running batch; the shorter of the two is padded on the left again, and the
   attention mask hides every padded position, so each row computes what it would alone
   (the left padding of ch07's ``shared.instruction.generate_batch_ids``);
2. step: every row's newest token goes through the model together, and each row samples its
   next token with its own settings (temperature, top-p, a seed of its own);
3. finish: a row that wrote end-of-text or a stop string, reached its token limit, or whose
   client went away leaves the batch; the others go on.

Each request's text reaches its listener as :class:`Event`\\ s, piece by piece. Text that
might be the start of a stop string, or half of a multi-byte character, is held back until
it is known, so the pieces always add up to the final text.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shared.generate import next_token


@dataclass(frozen=True)
class SamplingSettings:
    """How one request is generated. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}.")
        next_token(torch.zeros(1, 2), self.temperature, None, self.top_p)  # raises on bad settings


@dataclass(frozen=True)
class Event:
    """A piece of one request's answer. ``finish_reason`` is None until the last event:
    "stop" (end-of-text or a stop string), "length" (token limit or context full) or "error"."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class TextAssembler:
    """Turns a request's new token ids into text pieces that are safe to send.

    ``push(id)`` returns (new text, stopped). A stop string ends the text just before it; text
    that could still grow into a stop string, or that ends in an incomplete UTF-8 character
    (decoded as U+FFFD), waits for the next token. ``flush()`` returns what was held back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(self.sent - len(s) + 1, 0)) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text, min(hits)), True
        safe = len(text.rstrip("\ufffd"))
        safe -= self._partial_stop(text[:safe])
        return self._take(text, safe), False

    def flush(self) -> str:
        return self._take(self.tokenizer.decode(self.ids), None) if self.ids else ""

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the beginning of a stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


@dataclass(eq=False)
class GenerationRequest:
    """One request in the engine: its prompt, settings, listener and progress so far."""

    prompt_ids: list[int]
    settings: SamplingSettings
    on_event: Callable[[Event], None]
    text: TextAssembler
    rng_state: torch.Tensor | None = None  # the request's own random stream, when it samples
    generated: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine drops the row at its next step."""
        self.cancelled.set()

    def send(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a listener that is gone (its event loop closed) must not stop the others
            self.cancel()


class RunningBatch:
    """The rows being generated together: requests, their shared cache, mask and newest tokens.

    Every row's real tokens are the last columns of the cache (padding only on the left), so
    columns that are padding in every row can be cut off the front at any time.
    """

    def __init__(self, requests, cache, mask, last_ids):
        self.requests: list[GenerationRequest] = requests
        self.cache = cache  # list of KVCache, keys/values (rows, heads, width, head_dim)
        self.mask = mask  # (rows, width) long: 1 for real tokens, 0 for padding
        self.last_ids = last_ids  # (rows, 1) the token each row feeds next

    def __len__(self) -> int:
        return len(self.requests)

    def merge(self, other: RunningBatch) -> None:
        """Append ``other``'s rows, padding the narrower cache on the left to the same width."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache, other.cache, strict=True):
            mine.replace(
                torch.cat((_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2))),
                torch.cat((_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2))),
            )
        self.mask = torch.cat((_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)))
        self.last_ids = torch.cat((self.last_ids, other.last_ids))
        self.requests += other.requests

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in order), then cut the columns that are now padding everywhere."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self.cache:
            layer.replace(layer.keys.index_select(0, index), layer.values.index_select(0, index))
        self.mask, self.last_ids = self.mask.index_select(0, index), self.last_ids.index_select(0, index)
        self.requests = [self.requests[row] for row in rows]
        real_columns = self.mask.any(dim=0).nonzero()
        first = int(real_columns[0]) if len(real_columns) else self.mask.shape[1]
        if first > 0:
            for layer in self.cache:
                layer.replace(layer.keys[:, :, first:], layer.values[:, :, first:])
            self.mask = self.mask[:, first:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros in front along ``dim`` so that it is ``width`` long there."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    padding = [0, 0] * (tensor.ndim - 1 - dim) + [missing, 0]  # F.pad lists the last dim first
    return F.pad(tensor, padding)


class BatchingEngine:
    """Generates for many requests at once on a background thread (see the module docstring).

    ``submit`` queues a request and returns at once; its listener ``on_event`` is called from
    the engine's thread with each new piece of text and, last, an event with a finish reason.
    ``max_batch=1`` serves one request at a time (the baseline the benchmark compares with).
    """

    def __init__(self, model, tokenizer, eos_id: int, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_batch = max_batch
        self.context_length = model.context_length
        self.device = next(model.parameters()).device
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._batch: RunningBatch | None = None
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> BatchingEngine:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(
        self, prompt_ids: Sequence[int], settings: SamplingSettings, on_event: Callable[[Event], None]
    ) -> GenerationRequest:
        """Queue a request; raise ValueError when the prompt is empty or leaves no room to answer."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt has no tokens; send at least one character.")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, but the model's context holds "
                f"{self.context_length} including the answer; shorten the prompt."
            )
        rng_state = None
        if settings.temperature > 0:
            seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**63)
            rng_state = torch.Generator().manual_seed(seed).get_state()
        request = GenerationRequest(
            prompt_ids, settings, on_event, TextAssembler(self.tokenizer, settings.stop)
        )
        request.rng_state = rng_state
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def pending(self) -> int:
        """Requests waiting or generating."""
        return len(self._waiting) + (len(self._batch) if self._batch else 0)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and not self._batch:
                    self._wakeup.wait()
                if self._stopping:
                    break
                admitted = self._take_waiting()
            try:
                with torch.no_grad():
                    if admitted:
                        self._admit(admitted)
                    if self._batch:
                        self._step()
            except Exception as error:  # tell every client; the engine itself keeps serving
                for request in dict.fromkeys(admitted + (self._batch.requests if self._batch else [])):
                    request.send(Event("", "error", error=f"{type(error).__name__}: {error}"))
                self._batch = None
        for request in list(self._waiting) + (self._batch.requests if self._batch else []):
            request.send(Event("", "error", error="the server is shutting down"))

    def _take_waiting(self) -> list[GenerationRequest]:
        room = self.max_batch - (len(self._batch) if self._batch else 0)
        taken = []
        while self._waiting and len(taken) < room:
            request = self._waiting.popleft()
            if not request.cancelled.is_set():
                taken.append(request)
        return taken

    def _admit(self, requests: list[GenerationRequest]) -> None:
        """Prefill the new requests as one left-padded batch, pick their first tokens, join the batch."""
        width = max(len(r.prompt_ids) for r in requests)
        idx = torch.zeros((len(requests), width), dtype=torch.long)  # padding: any id, the mask hides it
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            idx[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        idx, mask = idx.to(self.device), mask.to(self.device)
        cache = self.model.new_cache()
        logits = self.model(idx, cache=cache, attention_mask=mask, last_only=True)[:, -1, :]
        newcomers = self._deliver(RunningBatch(requests, cache, mask, self._pick(requests, logits)))
        if self._batch is None:
            self._batch = newcomers
        elif newcomers is not None:
            self._batch.merge(newcomers)

    def _step(self) -> None:
        """One decode step for every row, then hand out the new tokens."""
        batch = self._batch
        batch.mask = torch.cat((batch.mask, torch.ones_like(batch.last_ids)), dim=1)
        logits = self.model(batch.last_ids, cache=batch.cache, attention_mask=batch.mask)[:, -1, :]
        batch.last_ids = self._pick(batch.requests, logits)
        self._batch = self._deliver(batch)

    def _pick(self, requests: list[GenerationRequest], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token (rows, 1): argmax for greedy rows, a draw from its own stream otherwise."""
        ids = next_token(logits, 0.0)
        for row, request in enumerate(requests):
            settings = request.settings
            if settings.temperature > 0:
                # The request's own random stream, so its tokens do not depend on its neighbours.
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(request.rng_state)
                    row_logits = logits[row : row + 1].float().cpu()
                    ids[row] = next_token(row_logits, settings.temperature, None, settings.top_p)[0]
                    request.rng_state = torch.get_rng_state()
        return ids

    def _deliver(self, batch: RunningBatch) -> RunningBatch | None:
        """Send each row its new token's text; return the batch without the rows that finished."""
        keep = []
        for row, (request, token_id) in enumerate(
            zip(batch.requests, batch.last_ids[:, 0].tolist(), strict=True)
        ):
            if request.cancelled.is_set():
                continue
            finish = self._advance(request, token_id)
            if finish is None:
                keep.append(row)
            else:
                piece = request.text.flush() if finish == "length" else ""
                request.send(Event(piece, finish, len(request.prompt_ids), request.generated))
        if not keep:
            return None
        if len(keep) < len(batch):
            batch.keep(keep)
        return batch

    def _advance(self, request: GenerationRequest, token_id: int) -> str | None:
        """Take one new token; return the finish reason, or None to go on."""
        if token_id == self.eos_id:
            request.send(Event(request.text.flush()))
            return "stop"
        request.generated += 1
        piece, stopped = request.text.push(token_id)
        if piece:
            request.send(Event(piece))
        if stopped:
            return "stop"
        full = len(request.prompt_ids) + request.generated >= self.context_length
        if request.generated >= request.settings.max_tokens or full:
            return "length"
        return None
