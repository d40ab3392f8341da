"""Instruction finetuning, the final form built in ch07.

The pieces, in the order the chapter uses them:

- prompt formats: the Alpaca template (the default) and the Phi-3 chat style;
- :class:`InstructionDataset` (each entry tokenised once) and :func:`collate_fn`, which pads a
  batch with the end-of-text id, shifts the targets by one and hides the padding (and, when asked,
  the instruction) from the loss with ``ignore_index``;
- :func:`generate_responses`: greedy (or sampled) answers to many prompts at once, with prompts
  of different lengths padded on the left in one batch and a key/value cache;
- offline metrics: :func:`rouge_l`, :func:`exact_match` and :func:`response_perplexity`.

The LLM judges that score responses are in :mod:`shared.judge`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from shared.data import validate_instruction_entries
from shared.generate import next_token
from shared.tokenizer import GPT2_EOT_ID, encode_text
from shared.utils import eval_mode
from shared.weights import STANDIN_CONFIG

END_OF_TEXT_ID = GPT2_EOT_ID  # GPT-2's <|endoftext|>: the end of every response, and the padding
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy skips targets with this value

# ---------------------------------------------------------------------------------------
# Prompt formats
# ---------------------------------------------------------------------------------------

PROMPT_STYLES = ("alpaca", "phi3")

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
# What comes between the prompt and the answer; the model learns to write its answer after it.
RESPONSE_HEADERS = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>\n"}


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}.")


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The instruction (and the input, when there is one) in the chosen prompt style.

    Alpaca: a fixed preamble, ``### Instruction:`` and, only when ``entry["input"]`` is not
    empty, ``### Input:``. Phi-3: the instruction and input after a ``<|user|>`` line.
    The response header is not included (see :func:`format_prompt`).
    """
    _check_style(style)
    instruction, extra = entry["instruction"], entry.get("input", "")
    if style == "phi3":
        return f"<|user|>\n{instruction}" + (f"\n{extra}" if extra else "")
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if extra:
        text += f"\n\n### Input:\n{extra}"
    return text


def format_prompt(entry: dict, style: str = "alpaca") -> str:
    """What the model sees before it answers: :func:`format_input` plus the response header."""
    return format_input(entry, style) + RESPONSE_HEADERS[style]


def format_example(entry: dict, style: str = "alpaca") -> str:
    """One training text: the prompt followed by the reference answer."""
    return format_prompt(entry, style) + entry["output"]


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def split_entries(entries: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, test, validation) slices in file order: 935 / 110 / 55 for the 1,100 entries.

    The first ``int(n * train_frac)`` entries train, the next ``int(n * test_frac)`` test, the
    rest validate (the book's split, so losses can be compared with its notebook).
    """
    if not (0 < train_frac < 1 and 0 <= test_frac < 1 and train_frac + test_frac < 1):
        raise ValueError(
            f"train_frac ({train_frac}) and test_frac ({test_frac}) must be fractions that leave "
            "something for validation."
        )
    n_train, n_test = int(len(entries) * train_frac), int(len(entries) * test_frac)
    return (
        list(entries[:n_train]),
        list(entries[n_train : n_train + n_test]),
        list(entries[n_train + n_test :]),
    )


class TokenizedExample(NamedTuple):
    """One training example: its token ids and how many of them are the prompt."""

    token_ids: list[int]
    prompt_length: int


class InstructionDataset(Dataset):
    """Instruction entries, each formatted in ``style`` and tokenised once, up front.

    Items are :class:`TokenizedExample`\\ s: the ids of prompt + response (no end-of-text yet:
    :func:`collate_fn` adds it) and the number of prompt tokens, which instruction masking needs.
    """

    def __init__(self, entries: Sequence[dict], tokenizer, style: str = "alpaca"):
        _check_style(style)
        validate_instruction_entries(list(entries), source="InstructionDataset entries")
        self.entries = list(entries)
        self.style = style
        self.examples: list[TokenizedExample] = []
        for entry in self.entries:
            # The whole text is tokenised at once, as the model will read it; the prompt's own
            # tokens tell where it ends (BPE could merge across the seam, so take the common prefix).
            ids = encode_text(tokenizer, format_example(entry, style))
            prompt_ids = encode_text(tokenizer, format_prompt(entry, style))
            prompt_length = 0
            while (
                prompt_length < min(len(ids), len(prompt_ids))
                and ids[prompt_length] == prompt_ids[prompt_length]
            ):
                prompt_length += 1
            self.examples.append(TokenizedExample(ids, prompt_length))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


def collate_fn(
    batch: Sequence,
    pad_token_id: int = END_OF_TEXT_ID,
    ignore_index: int = IGNORE_INDEX,
    context_length: int | None = None,
    device: str | torch.device | None = None,
    mask_instructions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a list of token-id lists into (inputs, targets), both (batch, length) int64 tensors.

    1. Each sequence gets one end-of-text token (``pad_token_id``) appended, so the model learns
       to stop, and is padded with the same id to the longest sequence in the batch (+1).
    2. inputs = all but the last position, targets = the same shifted left by one.
    3. In the targets, every padding token after a row's own end-of-text becomes
       ``ignore_index``: the loss skips them, but still teaches the one end-of-text.
    4. ``context_length`` cuts inputs and targets to at most that many positions (the book calls
       it ``allowed_max_length``).
    5. ``mask_instructions=True`` also hides the prompt: targets that are prompt tokens become
       ``ignore_index``, so only the response (and its end-of-text) is trained. The items must
       then be :class:`TokenizedExample`\\ s (as :class:`InstructionDataset` gives), which carry
       the prompt length.

    With masking and a ``context_length`` shorter than a prompt, a row can keep no target at
    all: that row teaches nothing, and a warning says so; when no row of the batch keeps one,
    its loss would be NaN, so a ValueError is raised instead.

    The tensors are built on the CPU and moved to ``device`` when one is given.
    """
    inputs, targets = _collate_rows(batch, pad_token_id, ignore_index, context_length, mask_instructions)
    if mask_instructions:
        _check_targets_left(targets, ignore_index, context_length)
    if device is None:
        return inputs, targets
    return inputs.to(device), targets.to(device)


def _check_targets_left(targets: torch.Tensor, ignore_index: int, context_length: int | None) -> None:
    """Warn about rows whose every target is ignored; refuse a batch where all are (a NaN loss)."""
    empty_rows = int((targets == ignore_index).all(dim=1).sum())
    if empty_rows == 0:
        return
    cause = (
        f"the prompts are longer than context_length={context_length}, so with mask_instructions=True "
        "no response token is left to learn"
    )
    if empty_rows == len(targets):
        raise ValueError(
            f"every target of the batch is ignored: {cause} (the loss would be NaN). Raise context_length "
            "or drop the longest examples."
        )
    warnings.warn(f"{empty_rows} of {len(targets)} rows keep no target: {cause}.", stacklevel=3)


def _collate_rows(batch, pad_token_id, ignore_index, context_length, mask_instructions):
    """:func:`collate_fn`'s (inputs, targets) on the CPU, without the check for rows left empty."""
    if len(batch) == 0:
        raise ValueError("collate_fn got an empty batch; check the dataset and batch_size.")
    if context_length is not None and context_length < 1:
        raise ValueError(f"context_length must be >= 1 or None, got {context_length}.")
    sequences, prompt_lengths = [], []
    for index, item in enumerate(batch):
        if isinstance(item, TokenizedExample):
            ids, prompt_length = list(item.token_ids), item.prompt_length
        else:
            ids, prompt_length = list(item), None
        if not ids:
            raise ValueError(f"item {index} of the batch has no tokens; every example needs at least one.")
        if mask_instructions and prompt_length is None:
            raise ValueError(
                "mask_instructions=True needs the prompt length of each item: pass TokenizedExample items "
                "(InstructionDataset yields them), not plain token lists."
            )
        sequences.append(ids)
        prompt_lengths.append(prompt_length)

    width = max(len(ids) for ids in sequences)  # each row: its tokens + end-of-text + padding
    inputs = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        n = len(ids)
        inputs[row, :n] = torch.tensor(ids)
        # Target j is the token after input j: ids[1:], then the end-of-text; the rest stays ignored.
        targets[row, : n - 1] = torch.tensor(ids[1:], dtype=torch.long)
        targets[row, n - 1] = pad_token_id
        if mask_instructions:
            # Target j is token j + 1; it belongs to the prompt when j + 1 < prompt_length.
            targets[row, : max(prompt_length - 1, 0)] = ignore_index
    if context_length is not None:
        inputs, targets = inputs[:, :context_length], targets[:, :context_length]
    return inputs, targets


# ---------------------------------------------------------------------------------------
# The model to finetune
# ---------------------------------------------------------------------------------------

# The stand-in for GPT-2 when its weights cannot be had (offline) and in quick mode (see
# shared.weights.load_gpt2_or_standin), with the head tied to the token embedding as in GPT-2.
SMALL_MODEL_CONFIG = {**STANDIN_CONFIG, "tie_weights": True}

# The tiny random model learns nothing at GPT-2's finetuning rate of 5e-5 in a few steps.
SMALL_MODEL_LR = 1e-3
PRETRAINED_LR = 5e-5


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_batch_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None = END_OF_TEXT_ID,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt in one batch (end-of-text and anything after it dropped).

    The prompts are padded on the left to the same length, and an attention mask tells the
    model which positions are padding: each row's positions start at 0 at its first real token
    and no token attends to padding, so each row computes what it would compute alone. The
    prompt runs through the model once, filling the key/value cache; after that each step feeds
    only the newest token of every row. A row that produced ``eos_id`` is finished (it keeps
    being fed ``eos_id`` so the batch stays rectangular); the loop ends when all rows are
    finished, after ``max_new_tokens`` steps, or when the padded batch fills the context window.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if len(prompt_ids) == 0:
        return []
    device = _model_device(model)
    context_length = model.context_length
    lengths = [len(ids) for ids in prompt_ids]
    for index, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {index} has no tokens.")
        if n >= context_length:
            raise ValueError(
                f"prompt {index} has {n} tokens, but the model's context holds {context_length} and "
                "needs room for at least one new token; shorten the prompt or use a model with a longer context."
            )
    width = max(lengths)
    idx = torch.zeros((len(lengths), width), dtype=torch.long)  # padding: any id, the mask hides it
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        idx[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    idx, mask = idx.to(device), mask.to(device)

    steps = min(max_new_tokens, context_length - width)
    finished = torch.zeros(len(lengths), dtype=torch.bool, device=device)
    new_tokens = []
    cache = model.new_cache()
    logits = model(idx, cache=cache, attention_mask=mask, last_only=True)  # the prompt's last logits only
    for step in range(steps):
        next_id = next_token(logits[:, -1, :], temperature, top_k)  # (batch, 1)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        new_tokens.append(next_id)
        if step == steps - 1 or (eos_id is not None and bool(finished.all())):
            break
        mask = torch.cat((mask, torch.ones_like(next_id)), dim=1)
        logits = model(next_id, cache=cache, attention_mask=mask)

    generated = torch.cat(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in lengths]
    if eos_id is not None:
        generated = [ids[: ids.index(eos_id)] if eos_id in ids else ids for ids in generated]
    return generated


def clean_response(text: str) -> str:
    """The answer alone: without surrounding whitespace or a leading response header the model wrote itself."""
    text = text.strip()
    for header in RESPONSE_HEADERS.values():
        label = header.strip()
        if text.startswith(label):
            text = text[len(label) :].strip()
    return text


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    eos_id: int = END_OF_TEXT_ID,
    temperature: float = 0.0,
    top_k: int | None = None,
    progress: bool = False,
) -> list[str]:
    """The model's response to each formatted prompt, in the order of ``prompts``.

    Greedy by default (``temperature=0``), so the result is exactly what one-at-a-time greedy
    generation gives, only faster:

    - prompts are sorted by token length and batched ``batch_size`` at a time, so a batch holds
      prompts of similar length and little padding; inside a batch they are padded on the left
      with an attention mask (see :func:`generate_batch_ids`);
    - a key/value cache means each new token costs one position, not the whole sequence;
    - each row stops at its own end-of-text; the batch stops when all rows have.

    The text of each response is the new tokens only (the prompt is cut off by position), with
    surrounding whitespace and a leading response header removed, in case the prompts did not
    end with one. The model runs where it is, in eval mode (dropout off), and is put back in its
    previous mode afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompt strings, not one string; wrap it in a list.")
    with eval_mode(model):
        encoded = [encode_text(tokenizer, prompt) for prompt in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="generating", unit="batch")
        responses: list[str] = [""] * len(prompts)
        for rows in batches:
            new_ids = generate_batch_ids(
                model, [encoded[i] for i in rows], max_new_tokens, eos_id, temperature, top_k
            )
            for i, ids in zip(rows, new_ids, strict=True):
                responses[i] = clean_response(tokenizer.decode(ids))
        return responses


# ---------------------------------------------------------------------------------------
# Offline metrics
# ---------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts: the longest common subsequence of their words.

    Words are runs of letters/digits, lowercased. precision = LCS / candidate words, recall =
    LCS / reference words, F1 their harmonic mean. When either text has no words the score is
    0.0 (as in Google's rouge-score package): an empty answer earns nothing.
    """
    cand, ref = _words(candidate), _words(reference)
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?")


def exact_match(candidate: str, reference: str) -> bool:
    """True when the texts are equal up to case, runs of whitespace and a final . ! or ?."""
    return _normalise(candidate) == _normalise(reference)


@torch.no_grad()
def response_perplexity(
    model,
    dataset: InstructionDataset,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> float:
    """exp(mean cross-entropy) of the reference responses (and their end-of-text) given the prompts.

    Only response tokens count (the prompt is masked as in ``collate_fn(mask_instructions=True)``);
    the mean is over tokens, not batches. Lower is better; a model that puts probability 1 on
    every reference token scores 1. Responses cut off by the model's context count only with the
    tokens that fit; when no response token fits at all, a ValueError says so (no number would mean anything).
    """
    if len(dataset) == 0:
        raise ValueError("response_perplexity got an empty dataset.")
    device = device or _model_device(model)
    total_loss, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            inputs, targets = _collate_rows(items, END_OF_TEXT_ID, IGNORE_INDEX, model.context_length, True)
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError(
            f"no response token fits in the model's context of {model.context_length} tokens: every prompt "
            "fills it. Use shorter prompts or a model with a longer context."
        )
    return math.exp(total_loss / total_tokens)


# The judge's score (shared.judge asks for it; parsing it is part of scoring, so it lives with the metrics)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_OUT_OF = rf"({_NUMBER})(?:\s*(?:/|out of)\s*(\d+))?"  # "8", "8/10", "8 out of 10"
_LABELLED = re.compile(rf"\bscore\b\s*(?:is|of|:|=|-)?\s*(?:\*\*)?\s*{_OUT_OF}", re.IGNORECASE)
_FRACTION = re.compile(rf"(?<![\w.]){_NUMBER}\s*(?:/|out of)\s*\d+", re.IGNORECASE)
_SCALE = re.compile(r"\b(?:from|of|between)\s+[01]\s*(?:to|and|-|–)\s*(\d+)\b", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*\d+[.)]\s", re.MULTILINE)
_BARE = re.compile(rf"(?<![\w.]){_OUT_OF}(?![\w])", re.IGNORECASE)
_SCALES = (5, 10, 100)


def _on_100(number: str, out_of: str | None) -> int | None:
    """``number`` (out of ``out_of``, default 100) as an integer from 0 to 100, or None."""
    value, top = float(number), int(out_of or 100)
    if value != int(value) or top not in _SCALES or not 0 <= value <= top:
        return None
    return round(value * 100 / top)


def _agreed(scores: list[int | None]) -> int | None:
    """The one score all candidates agree on; None if there are none, or they differ or are invalid."""
    return scores[0] if scores and len(set(scores)) == 1 else None


def parse_score(text: str | None) -> int | None:
    """The score from 0 to 100 a judge's reply means, or None ("unscored") when that is unclear.

    The judge is asked to reply ``Score: <integer from 0 to 100>`` (see ``shared.judge``). The rules,
    in order:

    1. Numbers after the word "score" decide: "Score: 85" -> 85, "1. Accuracy: the answer is
       right. Score: 90" -> 90 (the list number is not a score).
    2. Else a fraction on a scale of 5, 10 or 100: "Score: 8/10" -> 80, "I'd rate it 7 out of
       10" -> 70, "72/100" -> 72.
    3. Else the bare numbers, after dropping a scale ("on a scale of 0 to 100", "from 1 to 10": the
       scale's top sets what they are out of) and list numbers ("1." at a line start):
       "On a scale of 0 to 100, I would give this answer 85." -> 85; on a scale to 10, 8 -> 80.

    At the deciding step all candidates must agree, else the reply is unscored ("Accuracy score:
    30. Overall score: 85" -> None). Also None: a number out of range ("Score: 105", "-5",
    "12/10"), a decimal that is not whole ("0.85" could mean 85 or 1, "72.5"; "90.0" -> 90), an
    unknown scale ("3/7"), no number at all. Digits inside words ("Llama3") are not numbers.
    Callers count the unscored replies instead of guessing.
    """
    if not text:
        return None
    labelled = _LABELLED.findall(text)
    if labelled:
        return _agreed([_on_100(number, out_of) for number, out_of in labelled])
    if _FRACTION.search(text):
        return _agreed([_on_100(number, out_of) for number, out_of in _BARE.findall(text) if out_of])
    scale = _SCALE.search(text)
    top = scale.group(1) if scale else None
    rest = _LIST_MARKER.sub(" ", _SCALE.sub(" ", text))
    return _agreed([_on_100(number, out_of or top) for number, out_of in _BARE.findall(rest)])
