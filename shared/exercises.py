"""Checks for the exercises: ``check("ch04.2", answer)`` says right or wrong, never the solution.

Every exercise at the end of a chapter notebook has an id ("ch04.2": chapter 4, exercise 2;
"appendix_D.1") and one check here. A check verifies what a correct answer must satisfy: the
same ids as tiktoken, the same result as the course's own code on inputs of its own, a
parameter count, a value within a stated tolerance. Where the exercise asks for a function,
the check calls it on cases of its own. It prints one line:

- ``✓`` and what was verified, or
- ``✗`` with the first failing case (what was tried, what a right answer gives there, what came
  back) and a hint that points at the idea;
- ``·  not answered yet`` while the answer is still the placeholder (``...``, or a function
  that raises ``NotImplementedError``).

``check`` returns True only for ✓, and never raises for a wrong answer.
"""

import copy
import functools
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from shared import lora
from shared.attention import MultiHeadAttention
from shared.classification import (
    classification_loss,
    classifier_logits,
    label_ids,
    make_classifier,
    prepare_spam_splits,
    read_split,
)
from shared.data import load_instruction_data, load_sms_spam, load_the_verdict
from shared.dataloader import create_dataloader
from shared.generate import generate
from shared.instruction import IGNORE_INDEX, InstructionDataset, collate_fn, format_prompt, split_entries
from shared.model import GPT_CONFIGS, GPTModel, build_on_meta, count_parameters
from shared.tokenizer import (
    END_OF_TEXT,
    UNKNOWN,
    SimpleTokenizerV2,
    build_vocab,
    get_gpt2_tokenizer,
    simple_split,
)
from shared.train import lr_at, train_model
from shared.weights import STANDIN_CONFIG

# ---------------------------------------------------------------------------------------
# The machinery: a registry, the result line, and small helpers for the checks
# ---------------------------------------------------------------------------------------


class Wrong(Exception):
    """A failed case: what was tried, what a right answer gives, what came back, and a hint."""

    def __init__(self, case: str, expected: str, got, hint: str):
        super().__init__(case)
        self.case, self.expected, self.got, self.hint = case, expected, got, hint


class Exercise(NamedTuple):
    title: str
    run: Callable[[object], str]  # raises Wrong, or returns what was verified


EXERCISES: dict[str, Exercise] = {}


def exercise(exercise_id: str, title: str):
    """Register the decorated function as the check of ``exercise_id``."""

    def register(run):
        EXERCISES[exercise_id] = Exercise(title, run)
        return run

    return register


def _unanswered(answer) -> bool:
    if answer is Ellipsis:
        return True
    if isinstance(answer, dict):
        return any(_unanswered(value) for value in answer.values())
    if isinstance(answer, (list, tuple)):
        return any(_unanswered(value) for value in answer)
    return False


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(exercise_id: str, answer) -> bool:
    """Check ``answer`` to exercise ``exercise_id``; print one line; True only when it is right."""
    if exercise_id not in EXERCISES:
        raise ValueError(f"no exercise {exercise_id!r}; the ids are {', '.join(EXERCISES)}.")
    title, run = EXERCISES[exercise_id]
    head = f"{exercise_id} ({title})"
    if _unanswered(answer):
        print(f"·  {head}: not answered yet; replace the ... with your answer and run this cell again.")
        return False
    try:
        with torch.random.fork_rng(
            devices=[]
        ):  # a check draws its own cases: leave the learner's seeds alone
            verified = run(answer)
    except NotImplementedError:
        print(f"·  {head}: not answered yet; write the function's body and run this cell again.")
        return False
    except Wrong as wrong:
        print(
            f"✗  {head}: {wrong.case}: expected {wrong.expected}, got {_short(wrong.got)}. Hint: {wrong.hint}"
        )
        return False
    print(f"✓  {head}: {verified}")
    return True


def _need(ok: bool, case: str, expected: str, got, hint: str) -> None:
    if not ok:
        raise Wrong(case, expected, got, hint)


def _field(answer, key, form: str):
    """``answer[key]``, or a ✗ that shows the form the answer should have."""
    _need(
        isinstance(answer, dict), "the answer", f"a dict like {form}", answer, f"write the answer as {form}."
    )
    _need(
        key in answer,
        "the answer",
        f"a value for {key!r}",
        sorted(map(repr, answer)),
        f"write the answer as {form}.",
    )
    return answer[key]


def _number(value, what: str, hint: str) -> float:
    ok = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    _need(ok and not isinstance(value, bool), what, "a number", value, hint)
    return float(value)


def _truth(value):
    """A yes/no answer as a bool (a bool tensor or numpy bool is fine); anything else comes back unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        return bool(value)
    return bool(value) if type(value).__name__ in ("bool", "bool_") else value


def _call(function, description: str, *args, **kwargs):
    """Call the learner's function; an exception other than NotImplementedError becomes a ✗."""
    _need(
        callable(function), "the answer", "a function", function, "pass the function itself (no parentheses)."
    )
    try:
        return function(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as error:  # the learner's code: report it as a failed case
        raise Wrong(
            description,
            "a result",
            f"{type(error).__name__}: {error}",
            "run it on this case yourself and read the traceback.",
        ) from None


@functools.cache
def _tokenizer():
    return get_gpt2_tokenizer()


@functools.cache
def _verdict_ids() -> tuple[int, ...]:
    return tuple(_tokenizer().encode(load_the_verdict()))


def _windows(text_or_ids, batch_size: int, window: int, stride: int, drop_last: bool = True, **options):
    """A data loader over text_or_ids in order (the one place that names create_dataloader's window argument)."""
    return create_dataloader(
        text_or_ids,
        batch_size=batch_size,
        max_length=window,
        stride=stride,
        shuffle=False,
        drop_last=drop_last,
        **options,
    )


def _tiny_config(**changes) -> dict:
    return {
        **GPT_CONFIGS["gpt2-small"],
        "vocab_size": 97,
        "context_length": 32,
        "emb_dim": 32,
        "n_heads": 4,
        "n_layers": 2,
        "drop_rate": 0.0,
        **changes,
    }


# ---------------------------------------------------------------------------------------
# Chapter 2: tokens and windows
# ---------------------------------------------------------------------------------------


@exercise("ch02.1", "other windows")
def _other_windows(answer) -> str:
    form = "{(2, 2): (windows, shared tokens), (8, 2): (windows, shared tokens)}"
    text = load_the_verdict()
    for max_length, stride in [(2, 2), (8, 2)]:
        given = _field(answer, (max_length, stride), form)
        _need(
            isinstance(given, (tuple, list)) and len(given) == 2,
            f"max_length={max_length}, stride={stride}",
            "a pair (windows, shared tokens)",
            given,
            f"write the answer as {form}.",
        )
        loader = _windows(text, batch_size=4, window=max_length, stride=stride)
        case = f"max_length={max_length}, stride={stride}"
        _need(
            given[0] == len(loader.dataset),
            f"{case}, number of windows",
            "the number of windows the loader makes",
            given[0],
            "a window needs max_length + 1 tokens (inputs and the shifted targets), and windows start stride tokens apart.",
        )
        _need(
            given[1] == max(max_length - stride, 0),
            f"{case}, input tokens two consecutive windows share",
            "the overlap of two windows' inputs",
            given[1],
            "window i covers the inputs from i * stride to i * stride + max_length - 1.",
        )
    return "the window counts and overlaps match create_dataloader on The Verdict."


@exercise("ch02.2", "one word, several tokens")
def _one_word_several_tokens(answer) -> str:
    form = '{"single_token": [spellings], "any_shared_id": bool, "count_space_the": int, "count_the": int}'
    tokenizer = _tokenizer()
    spellings = ["Hello", " Hello", "hello", " hello", "HELLO"]
    encoded = {spelling: tokenizer.encode(spelling) for spelling in spellings}
    single = _field(answer, "single_token", form)
    _need(
        isinstance(single, (list, tuple, set)),
        "single_token",
        "a list of spellings",
        single,
        f"write the answer as {form}.",
    )
    _need(
        set(single) == {s for s in spellings if len(encoded[s]) == 1},
        "the spellings that are one token",
        "exactly the spellings that encode to a single id",
        sorted(single),
        "print the ids of each spelling: one id means one token; the space and the capitals belong to the token.",
    )
    all_ids = [i for ids in encoded.values() for i in ids]
    shared = len(set(all_ids)) < len(all_ids)
    _need(
        _truth(_field(answer, "any_shared_id", form)) is shared,
        "any_shared_id",
        "whether any id appears for two spellings",
        answer["any_shared_id"],
        "put all the ids in one list and compare its length with the number of distinct ids.",
    )
    ids = _verdict_ids()
    for key, piece in [("count_space_the", " the"), ("count_the", "the")]:
        _need(
            _field(answer, key, form) == ids.count(tokenizer.encode(piece)[0]),
            f"{key} in The Verdict",
            f"how often the id of {piece!r} occurs",
            answer[key],
            "count ids, not words: in running text a word follows a space, and GPT-2 keeps that space in front of the word.",
        )
    return "single tokens, shared ids and the counts of ' the' and 'the' match tiktoken."


@exercise("ch02.3", "unknown words in the word-level tokenizer")
def _unknown_words(answer) -> str:
    form = '{"unknown": [words that become <|unk|>], "decoded": "the decoded sentence"}'
    sentence = "The verdict was a sensation, and Gisburn's pictures sold at once."
    vocab = build_vocab(load_the_verdict(), special_tokens=[END_OF_TEXT, UNKNOWN])
    tokenizer = SimpleTokenizerV2(vocab)
    unknown = [token for token in simple_split(sentence) if token not in vocab]
    given = _field(answer, "unknown", form)
    _need(
        isinstance(given, (list, tuple, set)) and set(given) == set(unknown),
        "the words that become <|unk|>",
        "exactly the words of the sentence that are not in the story's vocabulary",
        given,
        "the vocabulary holds only the words of the story's text (not its title); look each word up in it.",
    )
    decoded = _field(answer, "decoded", form)
    _need(
        decoded == tokenizer.decode(tokenizer.encode(sentence)),
        "the decoded sentence",
        "what SimpleTokenizerV2 decodes",
        decoded,
        "decode the ids the tokenizer gave: every unknown word comes back as <|unk|>.",
    )
    return f"{len(unknown)} unknown words, and the decoded sentence matches SimpleTokenizerV2."


@exercise("ch02.4", "padding a batch")
def _padding_a_batch(answer) -> str:
    form = "(batch, mask): two tensors of shape (2, longest length)"
    texts = ["Hello, world.", "Your journey starts with one step."]
    encoded = [_tokenizer().encode(text) for text in texts]
    width = max(map(len, encoded))
    ok = (
        isinstance(answer, (tuple, list))
        and len(answer) == 2
        and all(isinstance(t, torch.Tensor) for t in answer)
    )
    _need(ok, "the answer", form, answer, f"write the answer as {form}.")
    batch, mask = answer
    _need(
        tuple(batch.shape) == (2, width),
        "the batch's shape",
        f"(2, {width}): one row per text, as long as the longer",
        tuple(batch.shape),
        "pad the shorter text up to the length of the longer one.",
    )
    _need(
        mask.dtype == torch.bool and tuple(mask.shape) == (2, width),
        "the mask",
        "a bool tensor of the batch's shape",
        f"{mask.dtype}, {tuple(mask.shape)}",
        "compare each position with something to get True/False values.",
    )
    for row, ids in enumerate(encoded):
        _need(
            batch[row][mask[row]].tolist() == ids,
            f"row {row}: the tokens where the mask is True",
            f"the ids of {texts[row]!r}",
            batch[row][mask[row]].tolist(),
            "the mask is True where a position holds a real token.",
        )
        _need(
            bool((batch[row][~mask[row]] == _tokenizer().eot_token).all()),
            f"row {row}: the padded positions",
            "the end-of-text id everywhere",
            batch[row][~mask[row]].tolist(),
            "GPT-2 pads with its end-of-text id, <|endoftext|>.",
        )
    return "the mask selects each text's ids, and every padded position holds the end-of-text id."


@exercise("ch02.5", "counting windows")
def _counting_windows(answer) -> str:
    form = '{"windows": int, "batches_drop_last": int, "batches_keep_last": int}'
    text = load_the_verdict()
    loaders = {
        drop: _windows(text, batch_size=8, window=256, stride=128, drop_last=drop) for drop in (True, False)
    }
    windows = len(loaders[True].dataset)
    _need(
        _field(answer, "windows", form) == windows,
        "windows for max_length=256, stride=128",
        "the number of windows",
        answer["windows"],
        "window i starts at i * stride and needs max_length + 1 tokens: the last start is at most n - 257.",
    )
    for key, drop in [("batches_drop_last", True), ("batches_keep_last", False)]:
        _need(
            _field(answer, key, form) == len(loaders[drop]),
            f"{key} (batch_size=8)",
            "the number of batches",
            answer[key],
            "drop_last=True throws away an incomplete last batch; drop_last=False keeps it.",
        )
    return f"{windows} windows and both batch counts match create_dataloader."


# ---------------------------------------------------------------------------------------
# Chapter 3: attention
# ---------------------------------------------------------------------------------------

WORDS = ["Your", "journey", "starts", "with", "one", "step"]
# The chapter's six 3-dimensional token vectors, one row per word.
INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],
        [0.55, 0.87, 0.66],
        [0.57, 0.85, 0.64],
        [0.22, 0.58, 0.33],
        [0.77, 0.25, 0.10],
        [0.05, 0.80, 0.55],
    ]
)


def _order_matters(attend: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """True when reordering the rows of x changes more than the order of attend's outputs."""
    generator = torch.Generator().manual_seed(0)
    orders = [torch.arange(len(x)).flip(0)] + [torch.randperm(len(x), generator=generator) for _ in range(3)]
    with torch.no_grad():
        return any(not torch.allclose(attend(x[order]), attend(x)[order], atol=1e-6) for order in orders)


@exercise("ch03.1", "attention does not know word order")
def _word_order(answer) -> str:
    form = '{"holds_without_mask": bool, "holds_with_causal_mask": bool}'
    generator = torch.Generator().manual_seed(789)
    w_query, w_key, w_value = (torch.rand(3, 2, generator=generator) for _ in range(3))

    def plain(x):
        scores = (x @ w_query) @ (x @ w_key).T / 2**0.5
        return torch.softmax(scores, dim=-1) @ (x @ w_value)

    causal = MultiHeadAttention(d_in=3, d_out=2, context_length=6, dropout=0.0, num_heads=1).eval()
    truths = {
        "holds_without_mask": not _order_matters(plain, INPUTS),
        "holds_with_causal_mask": not _order_matters(lambda x: causal(x.unsqueeze(0))[0], INPUTS),
    }
    hints = {
        "holds_without_mask": "without a mask each output is a weighted sum over all words; compare the new "
        "outputs with the old ones put in the same new order.",
        "holds_with_causal_mask": "with the causal mask a word sees only the words before it, so moving it "
        "changes what it sees.",
    }
    for key, truth in truths.items():
        given = _field(answer, key, form)
        _need(
            _truth(given) is truth,
            key,
            "whether outputs follow the words when they are reordered",
            given,
            hints[key],
        )
    return "without a mask attention follows any reordering; the causal mask breaks it."


@exercise("ch03.2", "two heads, two output dimensions")
def _two_heads(answer) -> str:
    form = '{"module": your attention module, "head_dim": int}'
    module = _field(answer, "module", form)
    batch = torch.stack((INPUTS, INPUTS))
    with torch.no_grad():
        out = _call(module, "module(batch) for the (2, 6, 3) batch", batch)
        _need(
            isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 6, 2),
            "module(batch)",
            "an output of shape (2, 6, 2)",
            getattr(out, "shape", out),
            "d_out is the width of the whole output, all heads together.",
        )
        changed = batch.clone()
        changed[:, -1] = torch.tensor([0.9, -0.4, 0.2])
        moved = (module(changed)[:, :-1] - out[:, :-1]).abs().max().item()
    _need(
        moved < 1e-6,
        "changing the last token",
        "no change at the earlier positions (a causal module)",
        moved,
        "build it causal: each position may only attend to itself and the positions before it.",
    )
    _need(
        _field(answer, "head_dim", form) == 1,
        "head_dim",
        "the dimensions each head gets",
        answer["head_dim"],
        "the heads split d_out between them: head_dim = d_out / num_heads.",
    )
    return "output (2, 6, 2), causal, and 1 dimension per head."


@exercise("ch03.3", "GPT-2-sized attention")
def _gpt2_attention(answer) -> str:
    form = '{"small": int, "small_qkv_bias": int, "xl": int, "xl_qkv_bias": int}'
    sizes = {"small": (768, 12), "xl": (1600, 25)}
    for name, (d, heads) in sizes.items():
        for bias in (False, True):
            key = f"{name}_qkv_bias" if bias else name
            with torch.device("meta"):
                count = count_parameters(MultiHeadAttention(d, d, 1024, 0.0, heads, qkv_bias=bias))
            given = _field(answer, key, form)
            hint = (
                "the query, key and value projections each have d x d weights"
                + (" and d biases" if bias else "")
                + "; the output projection has d x d weights and d biases; the number of heads does not change the count."
            )
            _need(
                given == count,
                f"{key} (d={d}, {heads} heads, qkv_bias={bias})",
                "the module's parameter count",
                given,
                hint,
            )
    return "all four parameter counts match shared.attention.MultiHeadAttention."


@exercise("ch03.4", "the mask really hides the future")
def _mask_hides_future(answer) -> str:
    form = '{"earlier_with_mask": float, "last_with_mask": float, "earlier_without_mask": float}'
    earlier = _number(
        _field(answer, "earlier_with_mask", form), "earlier_with_mask", f"write the answer as {form}."
    )
    last = _number(_field(answer, "last_with_mask", form), "last_with_mask", f"write the answer as {form}.")
    unmasked = _number(
        _field(answer, "earlier_without_mask", form), "earlier_without_mask", f"write the answer as {form}."
    )
    _need(
        earlier < 1e-6,
        "largest change at the earlier positions, with the mask",
        "0 (below 1e-6)",
        earlier,
        "change only the last token: with the causal mask no earlier position can see it.",
    )
    _need(
        last > 1e-6,
        "change at the last position, with the mask",
        "a change above 0",
        last,
        "the last position sees the token that changed, so its output must move.",
    )
    _need(
        unmasked > 1e-6,
        "largest change at the earlier positions, without the mask",
        "a change above 0",
        unmasked,
        "without the mask every position attends to every token, the changed last one included.",
    )
    return "with the mask only the last output moves; without it the earlier ones move too."


@exercise("ch03.5", "length versus direction")
def _length_versus_direction(answer) -> str:
    form = '{"dot": [the most-attended word for each query], "cosine": [...]}'
    stretched = INPUTS.clone()
    stretched[3] *= 3
    unit = stretched / stretched.norm(dim=-1, keepdim=True)
    expected = {
        "dot": [WORDS[j] for j in (stretched @ stretched.T).argmax(dim=-1)],
        "cosine": [WORDS[j] for j in (unit @ unit.T).argmax(dim=-1)],
    }
    hints = {
        "dot": "with 'with' three times as long, its dot product with every query grows threefold.",
        "cosine": "the cosine ignores length, so stretching a vector changes nothing; each word is closest to itself.",
    }
    for key, words in expected.items():
        given = _field(answer, key, form)
        given = list(given) if isinstance(given, (list, tuple)) else given
        _need(
            given == words,
            f"{key}, one word per query in the order {WORDS}",
            "the word each query attends to most",
            given,
            hints[key],
        )
    return "the most-attended words match, for dot products and for cosine similarities."


# ---------------------------------------------------------------------------------------
# Chapter 4: the GPT model
# ---------------------------------------------------------------------------------------

GPT2_SIZES = {"gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}


@exercise("ch04.1", "feed-forward vs attention")
def _feed_forward_vs_attention(answer) -> str:
    form = '{"feed_forward": int, "attention": int}'
    block = build_on_meta(GPT_CONFIGS["gpt2-small"]).trf_blocks[0]
    counts = {"feed_forward": count_parameters(block.ff), "attention": count_parameters(block.att)}
    hints = {
        "feed_forward": "two linear layers, d -> 4d and 4d -> d, each with a bias.",
        "attention": "GPT_CONFIG_124M has qkv_bias=False: three d x d projections without bias, "
        "then the output projection with its bias.",
    }
    for key, count in counts.items():
        given = _field(answer, key, form)
        _need(given == count, f"{key} of one GPT-2-small block", "its parameter count", given, hints[key])
    return f"feed-forward {counts['feed_forward']:,} and attention {counts['attention']:,} parameters."


@exercise("ch04.2", "the larger GPT-2 models")
def _larger_models(answer) -> str:
    form = '{"gpt2-medium": (config, parameters), "gpt2-large": (...), "gpt2-xl": (...)}'
    for name in GPT2_SIZES:
        given = _field(answer, name, form)
        _need(
            isinstance(given, (tuple, list)) and len(given) == 2 and isinstance(given[0], dict),
            name,
            "a pair (config dict, parameter count)",
            given,
            f"write the answer as {form}.",
        )
        config, parameters = given
        for key, value in GPT_CONFIGS[name].items():
            _need(
                config.get(key) == value,
                f"{name} config, {key!r}",
                f"GPT-2's value for {name}",
                config.get(key),
                "start from GPT_CONFIG_124M and change only the width, the depth and the number of heads.",
            )
        count = count_parameters(build_on_meta(config))
        _need(
            parameters == count,
            f"{name} parameters",
            "the count of the model built from that config",
            parameters,
            "count the model as built: unless the config ties them, the output head is a separate matrix from the token embedding.",
        )
    return "the three configs equal GPT_CONFIGS and the parameter counts match the models."


def _dropout_places(model) -> dict[str, list[float]]:
    """The rates at the three places GPTModel applies dropout (the one place to update if the model changes)."""
    return {
        "emb": [model.drop_emb.p],
        "attention": [block.att.dropout for block in model.trf_blocks],
        "shortcut": [block.drop_shortcut.p for block in model.trf_blocks],
    }


@exercise("ch04.3", "separate dropout rates")
def _separate_dropouts(build) -> str:
    cfg = _tiny_config(drop_rate=0.05)
    rates = {"emb": 0.1, "attention": 0.2, "shortcut": 0.3}
    model = _call(build, "build(cfg, emb=0.1, attention=0.2, shortcut=0.3)", cfg, **rates)
    _need(
        isinstance(model, GPTModel),
        "the built model",
        "a shared.model.GPTModel",
        type(model).__name__,
        "build a GPTModel from cfg, then set the three rates.",
    )
    for place, found in _dropout_places(model).items():
        _need(
            all(rate == rates[place] for rate in found),
            f"dropout at the {place} place(s)",
            f"{rates[place]} everywhere",
            found,
            "each of the three places has its own setting: the embeddings' dropout, each block's attention, each block's shortcut.",
        )
    return "each rate reaches its own place, and only its own."


def _cache_bytes(cfg: dict, num_tokens: int) -> int:
    """Bytes of the key/value cache GPTModel fills for one float32 prompt of num_tokens tokens."""
    model = GPTModel(cfg).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, num_tokens, dtype=torch.long), cache=cache)
    return sum(t.numel() * t.element_size() for layer in cache for t in (layer.keys, layer.values))


@exercise("ch04.4", "the cost of a KV cache")
def _kv_cache(kv_cache_bytes) -> str:
    cases = [
        (_tiny_config(), 10),
        (_tiny_config(n_layers=3, emb_dim=48, n_heads=2), 7),
        (_tiny_config(n_heads=8), 1),
    ]
    for cfg, num_tokens in cases:
        shape = f"n_layers={cfg['n_layers']}, emb_dim={cfg['emb_dim']}, n_heads={cfg['n_heads']}"
        given = _call(kv_cache_bytes, f"kv_cache_bytes(cfg with {shape}, {num_tokens})", cfg, num_tokens)
        _need(
            given == _cache_bytes(cfg, num_tokens),
            f"kv_cache_bytes(cfg with {shape}, num_tokens={num_tokens})",
            "the bytes of the cache GPTModel fills for one sequence",
            given,
            "every layer keeps a key and a value vector for each token; all heads together are emb_dim numbers; float32 is 4 bytes.",
        )
    return "the formula matches the caches GPTModel fills, for three model shapes."


def _head_share(cfg: dict, n: int) -> float:
    d = cfg["emb_dim"]
    blocks = cfg["n_layers"] * (
        24 * d * d + 2 * n * d
    )  # section 4.8: attention 8d^2 + 2nd, feed-forward 16d^2
    head = 2 * d * cfg["vocab_size"]
    return head / (blocks + head)


@exercise("ch04.5", "where the head's FLOPs go")
def _head_flops(answer) -> str:
    form = '{"gpt2-small": share, "gpt2-medium": share, "gpt2-large": share, "gpt2-xl": share}'
    for name, cfg in GPT_CONFIGS.items():
        given = _number(
            _field(answer, name, form), name, f"write the answer as {form}, each share a fraction."
        )
        _need(
            abs(given - _head_share(cfg, 1024)) < 0.005,
            f"{name} at 1,024 tokens (tolerance 0.005)",
            "the head's share of the forward FLOPs per token, a fraction between 0 and 1",
            given,
            "share = head / (blocks + head): the whole forward pass, blocks and head together, is the denominator.",
        )
    return "the head's share matches forward_flops_per_token for all four sizes."


# ---------------------------------------------------------------------------------------
# Chapter 5: pretraining and decoding
# ---------------------------------------------------------------------------------------

TOY_WORDS = ["mat", "floor", "sofa", "roof", "dog", "moon", "piano", "idea", "sang"]
TOY_LOGITS = torch.tensor(
    [5.2, 4.6, 3.9, 2.4, 1.1, 0.2, -0.8, -1.5, -2.7]
)  # section 5.5's toy next-word logits


@exercise("ch05.1", "deterministic generation")
def _deterministic_generation(answer) -> str:
    form = "a list of settings dicts, e.g. [dict(temperature=...), ...]"
    _need(
        isinstance(answer, (list, tuple)) and answer and all(isinstance(s, dict) for s in answer),
        "the answer",
        form,
        answer,
        f"write the answer as {form}.",
    )
    torch.manual_seed(0)
    model = GPTModel(_tiny_config()).eval()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, max_new_tokens=20)
    for settings in answer:
        outputs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs.append(
                _call(generate, f"generate(..., **{settings})", model, prompt, max_new_tokens=20, **settings)
            )
        _need(
            all(torch.equal(out, greedy) for out in outputs),
            f"generate(..., **{settings}) with seeds 1 and 2",
            "the greedy text both times",
            "different texts",
            "sampling is random unless only one token can be chosen.",
        )
    temperatures = [settings.get("temperature", 0.0) for settings in answer]
    _need(
        min(temperatures) == 0 and max(temperatures) > 0,
        "the list of settings",
        "temperature 0, and a setting with temperature above 0 that is still deterministic",
        answer,
        "temperature 0 is one way; which top_k, or which top_p, leaves a single token to sample from at any temperature?",
    )
    return (
        f"all {len(answer)} settings give the greedy text whatever the seed, with and without temperature 0."
    )


@exercise("ch05.2", "temperature in numbers")
def _temperature_in_numbers(answer) -> str:
    form = "{1.0: probability of 'piano', 3.0: probability of 'piano'}"
    piano = TOY_WORDS.index("piano")
    for temperature in (1.0, 3.0):
        given = _number(
            _field(answer, temperature, form), f"temperature {temperature}", f"write the answer as {form}."
        )
        exact = torch.softmax(TOY_LOGITS / temperature, dim=0)[piano].item()
        _need(
            abs(given - exact) <= 0.02 * exact,
            f"p('piano') at temperature {temperature} (2% tolerance)",
            "the softmax probability, a number between 0 and 1",
            given,
            "divide the logits by the temperature, then take the softmax; give a probability, not a count.",
        )
    return "both probabilities match the softmax of the tempered logits."


@exercise("ch05.3", "top-p vs top-k")
def _top_p_vs_top_k(nucleus_size) -> str:
    generator = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 6.0):
        logits = torch.randn(100, generator=generator) * scale
        probs = torch.sort(torch.softmax(logits, dim=-1), descending=True).values
        for top_p in (0.5, 0.9, 0.99):
            smallest = (
                int((probs.cumsum(-1) < top_p).sum()) + 1
            )  # the smallest set whose probability reaches top_p
            given = _call(nucleus_size, f"nucleus_size(logits, {top_p})", logits.clone(), top_p)
            _need(
                given == smallest,
                f"nucleus_size(100 random logits with std {scale}, top_p={top_p})",
                "the size of the smallest set of the most likely tokens whose probability reaches top_p",
                given,
                "sort the probabilities from high to low, and keep the token that makes the sum reach top_p.",
            )
    return "the nucleus sizes match the smallest sets reaching top_p, for flat and peaked distributions."


def _tiny_training_run(tmp: Path):
    """A model, optimizer and loaders; trains 1 epoch with a checkpoint; returns them and the 2-epoch weights."""
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    loaders = [
        _windows(part, batch_size=2, window=8, stride=8, vocab_size=97) for part in (ids[:84], ids[84:])
    ]

    def fresh(seed):
        torch.manual_seed(seed)
        model = GPTModel(_tiny_config(emb_dim=16, n_layers=1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    settings = dict(eval_freq=5, eval_iter=1, progress=False)
    reference, optimizer = fresh(0)
    train_model(reference, *loaders, optimizer, "cpu", 2, **settings)
    model, optimizer = fresh(0)
    train_model(model, *loaders, optimizer, "cpu", 1, checkpoint_path=tmp / "epoch1.pt", **settings)
    return loaders, fresh, reference


@exercise("ch05.4", "continue training a checkpoint")
def _continue_training(train_one_more_epoch) -> str:
    _need(
        callable(train_one_more_epoch),
        "the answer",
        "a function",
        train_one_more_epoch,
        "pass the function itself.",
    )
    with tempfile.TemporaryDirectory() as tmp:
        (train_loader, val_loader), fresh, reference = _tiny_training_run(Path(tmp))
        model, optimizer = fresh(1)  # different starting weights: only the checkpoint can make them right
        case = "train_one_more_epoch(model, optimizer, checkpoint after 1 epoch, ...)"
        history = _call(
            train_one_more_epoch,
            case,
            model,
            optimizer,
            Path(tmp) / "epoch1.pt",
            train_loader,
            val_loader,
            "cpu",
        )
    _need(
        getattr(history, "epoch", None) == 2,
        f"{case}: the history's epoch",
        "2 (1 done + 1 more)",
        getattr(history, "epoch", history),
        "num_epochs counts all epochs, the ones done before the checkpoint included.",
    )
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    _need(
        same,
        f"{case}: the weights",
        "bitwise those of an uninterrupted 2-epoch run",
        "different weights",
        "load everything the checkpoint holds (weights, optimizer moments, history) and pass the history on.",
    )
    return "one more epoch from the checkpoint gives bitwise the weights of an uninterrupted run."


@exercise("ch05.5", "beam width")
def _beam_width(repeated_trigram_share) -> str:
    cases = [
        ([1, 2, 3, 4, 5, 6], 0.0),
        ([7] * 6, 1.0),
        ([1, 2, 3, 1, 2, 3], 0.5),
        ([1, 2, 3, 9, 1, 2, 3, 9], 4 / 6),
        ([5, 1, 2, 3, 1, 2, 3, 4], 2 / 6),
    ]
    for ids, share in cases:
        given = _number(
            _call(repeated_trigram_share, f"repeated_trigram_share({ids})", list(ids)),
            f"repeated_trigram_share({ids})",
            "return the share as a number.",
        )
        _need(
            abs(given - share) < 1e-9,
            f"repeated_trigram_share({ids})",
            "the share of 3-gram positions whose 3-gram occurs more than once",
            given,
            "slide a window of 3 consecutive ids one step at a time; count every position whose 3-gram appears elsewhere too.",
        )
    return f"the repeated 3-gram share is right on {len(cases)} sequences."


@exercise("ch05.6", "GPT-2 medium vs small")
def _medium_vs_small(answer) -> str:
    form = '{"gpt2-small": (train loss, validation loss), "gpt2-medium": (train loss, validation loss)}'
    losses = {}
    for name in ("gpt2-small", "gpt2-medium"):
        given = _field(answer, name, form)
        _need(
            isinstance(given, (tuple, list)) and len(given) == 2,
            name,
            "a pair (train loss, validation loss)",
            given,
            f"write the answer as {form}.",
        )
        losses[name] = [_number(v, name, f"write the answer as {form}.") for v in given]
    for split, loss, book in zip(("train", "validation"), losses["gpt2-small"], (3.75, 3.56), strict=True):
        _need(
            abs(loss - book) < 0.1,
            f"gpt2-small {split} loss (tolerance 0.1)",
            f"about {book}",
            loss,
            "use the chapter's loaders (context 256, 90/10 split) and OpenAI's weights: calc_loss_loader over all batches.",
        )
    for index, split in enumerate(("train", "validation")):
        _need(
            losses["gpt2-medium"][index] < losses["gpt2-small"][index],
            f"gpt2-medium {split} loss",
            "below GPT-2 small's",
            losses["gpt2-medium"][index],
            "load the 355M model's weights for medium; a larger model trained on the same data predicts English better.",
        )
    return "small's losses match the known values, and medium's are lower on both splits."


@exercise("ch05.7", "learning rate")
def _learning_rate(answer) -> str:
    form = "{1e-4: validation loss, 4e-4: validation loss, 1e-3: validation loss}"
    losses = {
        lr: _number(_field(answer, lr, form), f"lr {lr:g}", f"write the answer as {form}.")
        for lr in (1e-4, 4e-4, 1e-3)
    }
    _need(
        all(0 < loss < 20 for loss in losses.values()),
        "the validation losses",
        "cross-entropies between 0 and 20",
        losses,
        "report the validation loss (calc_loss_loader or the history's last value), not a perplexity.",
    )
    _need(
        len(set(losses.values())) == 3,
        "the three runs",
        "three different losses",
        losses,
        "give each run a fresh model (same seed) and an optimizer created with that run's learning rate.",
    )
    best = min(losses, key=losses.get)
    return f"three runs reported; the lowest validation loss is at lr {best:g} (a short run favours the largest rate)."


@exercise("ch05.8", "initialisation")
def _initialisation(answer) -> str:
    form = '{"gpt2": std of the token embeddings, "pytorch": std of the token embeddings}'
    model = GPTModel(_tiny_config(vocab_size=2000))
    expected = {"gpt2": model.tok_emb.weight.std().item()}
    model.reset_parameters("pytorch")
    expected["pytorch"] = model.tok_emb.weight.std().item()
    for scheme, std in expected.items():
        given = _number(_field(answer, scheme, form), scheme, f"write the answer as {form}.")
        _need(
            abs(given - std) <= 0.25 * std,
            f"{scheme} initialisation (25% tolerance: training moves them a little)",
            "the standard deviation of the token embedding's weights",
            given,
            "GPT-2 draws its embeddings from N(0, 0.02), PyTorch's nn.Embedding from N(0, 1); give the std, not the variance.",
        )
    return "both embedding standard deviations match their initialisation."


# ---------------------------------------------------------------------------------------
# Chapter 6: finetuning for classification
# ---------------------------------------------------------------------------------------


def _accuracies(answer, keys: tuple[str, ...], form: str) -> dict[str, float]:
    found = {key: _number(_field(answer, key, form), key, f"write the answer as {form}.") for key in keys}
    _need(
        all(0 <= value <= 1 for value in found.values()),
        "the accuracies",
        "fractions between 0 and 1",
        found,
        "give accuracies as fractions (0.95), not percentages.",
    )
    return found


@exercise("ch06.1", "train more layers")
def _train_more_layers(answer) -> str:
    form = '{"trainable_blocks": 2 (or 0 or "all"), "trainable_parameters": int}'
    blocks = _field(answer, "trainable_blocks", form)
    _need(
        blocks == "all" or (isinstance(blocks, int) and 0 <= blocks <= 12),
        "trainable_blocks",
        'an int from 0 to the number of blocks, or "all"',
        blocks,
        f"write the answer as {form}.",
    )
    given = _field(answer, "trainable_parameters", form)
    counts = {}
    gpt2_small = {**GPT_CONFIGS["gpt2-small"], "qkv_bias": True}  # as loaded from OpenAI's weights
    for name, cfg in [("GPT-2 small", gpt2_small), ("the stand-in model", STANDIN_CONFIG)]:
        if blocks == "all" or blocks <= cfg["n_layers"]:
            model = make_classifier(build_on_meta(cfg), trainable_blocks=blocks)
            counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    matches = [name for name, count in counts.items() if count == given]
    _need(
        bool(matches),
        f"trainable parameters with trainable_blocks={blocks!r}",
        "the count of parameters with requires_grad=True in the classifier",
        given,
        "the last blocks train, and so do the final norm and the new 2-output head (not the old vocabulary head).",
    )
    return f"{given:,} trainable parameters, as make_classifier gives for {matches[0]}."


@exercise("ch06.2", "first token versus last token")
def _first_versus_last(answer) -> str:
    form = '{"last": accuracy, "first": accuracy, "first_no_mask": accuracy}'
    acc = _accuracies(answer, ("last", "first", "first_no_mask"), form)
    _need(
        acc["first"] < acc["last"],
        "first-token accuracy",
        "below the last token's",
        acc,
        "under the causal mask the first token attends only to itself: read it with pooling='first' and the mask on.",
    )
    _need(
        acc["first_no_mask"] > acc["first"],
        "first-token accuracy without the causal mask",
        "above the masked first token's",
        acc,
        "with causal=False every token sees the whole message, the first one included.",
    )
    return "the first token is the worst reading place under the causal mask, and improves without it."


@exercise("ch06.3", "pad to the full context")
def _pad_to_context(answer) -> str:
    form = '{"dynamic": accuracy, "padded_last_token": accuracy, "padded_last_position": accuracy}'
    acc = _accuracies(answer, ("dynamic", "padded_last_token", "padded_last_position"), form)
    _need(
        abs(acc["padded_last_token"] - acc["dynamic"]) <= 0.01,
        "padded to the context, reading the last real token",
        "the accuracy of dynamic padding (within 0.01)",
        acc,
        "with the causal mask, padding after the last real token cannot change that token's output: "
        "same seed, same data, same accuracy; read the last real token (pooling='last'), not position -1.",
    )
    return "padding does not change what the last real token sees; only the cost grows."


@exercise("ch06.4", "a different balancing strategy")
def _oversampling(frame) -> str:
    columns = set(getattr(frame, "columns", ()))
    _need(
        {"Label", "Text"} <= columns,
        "the answer",
        "a DataFrame with columns 'Label' and 'Text'",
        type(frame).__name__,
        "pass the oversampled training DataFrame itself.",
    )
    paths = prepare_spam_splits()
    held_out = set(read_split(paths["validation"])["Text"]) | set(read_split(paths["test"])["Text"])
    leaked = frame["Text"][frame["Text"].isin(held_out)]
    _need(
        leaked.empty,
        "messages also in the validation or test split",
        "none",
        f"{len(leaked)}, e.g. {leaked.iloc[0]!r}" if not leaked.empty else 0,
        "set the validation and test messages aside before drawing the training messages.",
    )
    labels = label_ids(frame["Label"])
    spam_count, ham_count = sum(labels), len(labels) - sum(labels)
    _need(
        spam_count == ham_count,
        "messages per class",
        "as many spam as ham",
        {"ham": ham_count, "spam": spam_count},
        "draw spam messages with replacement until there are as many as ham.",
    )
    messages = load_sms_spam()
    available = int(((messages["Label"] == "spam") & ~messages["Text"].isin(held_out)).sum())
    _need(
        spam_count > available,
        "spam messages in the training data",
        f"more than the {available} spam messages outside validation and test (drawn with replacement)",
        spam_count,
        "keep more ham than there is spam, and oversample spam to match.",
    )
    return f"{len(frame):,} messages, balanced, spam drawn with replacement, none from validation or test."


@exercise("ch06.5", "one output node")
def _one_output_node(one_logit) -> str:
    generator = torch.Generator().manual_seed(0)
    two = torch.randn(64, 2, generator=generator) * 3
    labels = torch.randint(0, 2, (64,), generator=generator)
    one = _call(one_logit, "one_logit(two-output logits of shape (64, 2))", two.clone())
    _need(
        isinstance(one, torch.Tensor) and tuple(one.shape) in {(64, 1), (64,)},
        "one_logit(logits (64, 2))",
        "a tensor of shape (64, 1)",
        getattr(one, "shape", one),
        "one logit per message.",
    )
    one = one.reshape(64)
    _need(
        torch.equal(one > 0, two.argmax(dim=-1) == 1),
        "the decisions on 64 random logit pairs",
        "sigmoid(one) > 0.5 exactly where the softmax picks spam (class 1)",
        "different decisions",
        "softmax over two logits (a, b) gives P(spam) = sigmoid(b - a): which difference is it?",
    )
    bce = F.binary_cross_entropy_with_logits(one, labels.float())
    _need(
        torch.allclose(bce, F.cross_entropy(two, labels), atol=1e-5),
        "the losses on 64 random logit pairs",
        "binary cross-entropy of the one logit equal to the cross-entropy of the two",
        f"{bce.item():.4f}",
        "the single logit must carry the whole difference between the two, not only one of them.",
    )
    return "one logit with a sigmoid gives the same decisions and the same loss as two with a softmax."


# ---------------------------------------------------------------------------------------
# Chapter 7: instruction finetuning
# ---------------------------------------------------------------------------------------


@functools.cache
def _instruction_samples() -> tuple[dict, ...]:
    """A few entries of each split, short and long, for the checks to run functions on."""
    train, test, validation = split_entries(load_instruction_data())
    return tuple(train[:6] + validation[:3] + test[:3])


def _loss_tokens(entries, mask_instructions: bool) -> int:
    """How many targets the loss counts, each entry collated on its own (so there is no padding)."""
    dataset = InstructionDataset(list(entries), _tokenizer())
    batches = (collate_fn([example], mask_instructions=mask_instructions) for example in dataset)
    return sum(int((targets != IGNORE_INDEX).sum()) for _, targets in batches)


@exercise("ch07.1", "Phi-3 prompt style")
def _phi3_tokens(prompt_tokens_saved) -> str:
    tokenizer = _tokenizer()
    for index, entry in enumerate(_instruction_samples()):
        saved = len(tokenizer.encode(format_prompt(entry, "alpaca"))) - len(
            tokenizer.encode(format_prompt(entry, "phi3"))
        )
        given = _call(prompt_tokens_saved, f"prompt_tokens_saved(sample entry {index})", dict(entry))
        _need(
            given == saved,
            f"prompt_tokens_saved(entry with instruction {entry['instruction'][:40]!r})",
            "the Alpaca prompt's token count minus the Phi-3 prompt's",
            given,
            "format the entry's prompt in both styles and count GPT-2 tokens, not characters.",
        )
    return "the tokens saved match format_prompt's two styles on 12 entries."


@exercise("ch07.2", "masking the instructions")
def _masked_share(share_in_loss) -> str:
    samples = _instruction_samples()
    for entries in (samples[:4], samples[4:]):
        share = _loss_tokens(entries, True) / _loss_tokens(entries, False)
        given = _number(
            _call(share_in_loss, f"share_in_loss({len(entries)} entries)", list(entries)),
            "share_in_loss",
            "return the share as a number between 0 and 1.",
        )
        _need(
            abs(given - share) < 0.002,
            f"share_in_loss({len(entries)} entries)",
            "the fraction of target tokens still counted with the instructions masked",
            given,
            "count the targets that are not -100, with and without masking; the end-of-text target still counts.",
        )
    return "the share of targets left in the loss matches collate_fn(mask_instructions=True)."


@exercise("ch07.3", "partial finetuning")
def _partial_finetuning(freeze_all_but_last) -> str:
    for tied, num_blocks in [(False, 1), (True, 2)]:
        torch.manual_seed(0)
        model = GPTModel(_tiny_config(n_layers=3, tie_weights=tied))
        case = f"freeze_all_but_last(3-block model{' with a tied head' if tied else ''}, {num_blocks})"
        result = _call(freeze_all_but_last, case, model, num_blocks)
        model = result if isinstance(result, GPTModel) else model
        keep = [block for block in model.trf_blocks[-num_blocks:]] + [model.final_norm, model.out_head]
        wanted = {id(p) for module in keep for p in module.parameters()}
        wrong = [name for name, p in model.named_parameters() if p.requires_grad != (id(p) in wanted)]
        _need(
            not wrong,
            case,
            "requires_grad only on the last blocks, the final norm and the output head",
            f"wrong requires_grad on {wrong[:3]}",
            "freeze every parameter first, then unfreeze the LAST blocks (the ones nearest the output), "
            "the final norm and the head.",
        )
    return "only the last blocks, the final norm and the head train, with and without a tied head."


@exercise("ch07.4", "maximum length")
def _maximum_length(share_kept) -> str:
    entries = list(_instruction_samples())
    for max_length in (32, 48, 64):
        # Training tokens are the target positions; counting each sequence with its end-of-text is fine too.
        lengths = [len(example.token_ids) for example in InstructionDataset(entries, _tokenizer())]
        shares = [
            sum(min(n + extra, max_length) for n in lengths) / sum(n + extra for n in lengths)
            for extra in (0, 1)
        ]
        given = _number(
            _call(share_kept, f"share_kept(12 entries, {max_length})", entries, max_length),
            "share_kept",
            "return the share as a number between 0 and 1.",
        )
        _need(
            min(abs(given - share) for share in shares) < 0.005,
            f"share_kept(12 entries, max_length={max_length}) (tolerance 0.005)",
            "the fraction of the training tokens that survive the cut",
            given,
            "count tokens, not examples: a cut keeps the first max_length tokens of each example.",
        )
    return "the surviving share of the training tokens is right at three lengths."


@exercise("ch07.5", "another judge")
def _another_judge(answer) -> str:
    form = '{"judge model name": average score, "other judge": average score}'
    _need(
        isinstance(answer, dict) and len(answer) >= 2,
        "the answer",
        f"two judges or more, as {form}",
        answer,
        "score the same responses with two different judge models.",
    )
    for name, average in answer.items():
        value = _number(average, f"the average of {name!r}", f"write the answer as {form}.")
        _need(
            0 <= value <= 100,
            f"the average of {name!r}",
            "a score from 0 to 100",
            value,
            "the judge prompt asks for a score from 0 to 100; average the parsed scores.",
        )
    spread = max(answer.values()) - min(answer.values())
    return f"{len(answer)} judges, averages {spread:.1f} points apart."


# ---------------------------------------------------------------------------------------
# Appendix A: PyTorch
# ---------------------------------------------------------------------------------------

_A = torch.arange(24).reshape(2, 3, 4)
SHAPE_PUZZLE = {  # expression -> (how to compute it, the hint when its predicted shape is wrong)
    "a.transpose(1, 2)": (lambda a: a.transpose(1, 2), "transpose swaps the two dimensions it names."),
    "a @ a.transpose(1, 2)": (
        lambda a: a @ a.transpose(1, 2),
        "@ multiplies the last two dimensions; the ones before are a batch.",
    ),
    "a.sum(dim=1)": (lambda a: a.sum(dim=1), "summing over a dimension removes it."),
    "a.reshape(-1, 4)": (
        lambda a: a.reshape(-1, 4),
        "-1 stands for whatever size makes the number of elements fit.",
    ),
    "a[:, 0]": (lambda a: a[:, 0], "an integer index removes its dimension."),
    "a[..., :1]": (lambda a: a[..., :1], "a slice keeps its dimension, even when it has length 1."),
    "a.unsqueeze(1)": (lambda a: a.unsqueeze(1), "unsqueeze inserts a dimension of size 1 at that position."),
    "a + torch.ones(4)": (lambda a: a + torch.ones(4), "broadcasting lines shapes up from the right."),
    "a + torch.ones(3, 1)": (
        lambda a: a + torch.ones(3, 1),
        "a dimension of size 1 stretches to match the other.",
    ),
}
MAYBE_FAILING = {
    "a.view(4, -1)": lambda a: a.view(4, -1),
    "a.transpose(1, 2).view(-1)": lambda a: a.transpose(1, 2).view(-1),
    "a + torch.ones(3)": lambda a: a + torch.ones(3),
}


def _fails(compute) -> bool:
    try:
        compute(_A)
    except RuntimeError:
        return True
    return False


@exercise("appendix_A.1", "shape puzzle")
def _shape_puzzle(answer) -> str:
    form = '{"a.transpose(1, 2)": (2, 4, 3), ..., "fails": [the expressions that fail]}'
    given = (
        {" ".join(str(key).split()): value for key, value in answer.items()}
        if isinstance(answer, dict)
        else answer
    )
    for expression, (compute, hint) in SHAPE_PUZZLE.items():
        shape = _field(given, expression, form)
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
        _need(shape == tuple(compute(_A).shape), expression, "its shape", shape, hint)
    failing = _field(given, "fails", form)
    expected = {expression for expression, compute in MAYBE_FAILING.items() if _fails(compute)}
    failing = (
        {" ".join(str(e).split()) for e in failing} if isinstance(failing, (list, tuple, set)) else failing
    )
    _need(
        failing == expected,
        "the expressions that fail",
        "exactly the ones that raise an error",
        failing,
        "view needs memory laid out in order (contiguous), which a transpose is not; broadcasting needs each "
        "pair of trailing sizes to be equal or 1.",
    )
    return f"all {len(SHAPE_PUZZLE)} shapes and the failing expressions are right."


@exercise("appendix_A.2", "counting parameters by hand")
def _counting_parameters(answer) -> str:
    form = '{"per_layer": [first, second, third linear layer], "total": int}'
    layers = [torch.nn.Linear(2, 30), torch.nn.Linear(30, 20), torch.nn.Linear(20, 2)]
    counts = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    per_layer = _field(answer, "per_layer", form)
    per_layer = list(per_layer) if isinstance(per_layer, (list, tuple)) else per_layer
    _need(
        per_layer == counts,
        "parameters of Linear(2, 30), Linear(30, 20), Linear(20, 2)",
        "each layer's count",
        per_layer,
        "a Linear(n_in, n_out) has n_in x n_out weights and one bias per output; ReLU has none.",
    )
    _need(
        _field(answer, "total", form) == sum(counts),
        "total",
        "the sum over the layers",
        answer["total"],
        "add up the three linear layers.",
    )
    return f"{counts} parameters, {sum(counts)} in all."


@exercise("appendix_A.3", "one gradient step by hand")
def _one_gradient_step(answer) -> str:
    form = '{"w": [w1, w2], "b": float, "loss_after": float}'
    x, y = torch.tensor([0.5, -1.5]), torch.tensor(1.0)
    w = torch.tensor([0.8, 0.3], requires_grad=True)
    b = torch.tensor(0.1, requires_grad=True)
    F.binary_cross_entropy(torch.sigmoid(x @ w + b), y).backward()
    with torch.no_grad():
        w -= 0.1 * w.grad
        b -= 0.1 * b.grad
        loss_after = F.binary_cross_entropy(torch.sigmoid(x @ w + b), y).item()
    expected = {"w": w.tolist(), "b": [b.item()], "loss_after": [loss_after]}
    for key, values in expected.items():
        given = _field(answer, key, form)
        given = (
            [float(v) for v in given]
            if isinstance(given, (list, tuple, torch.Tensor))
            else [_number(given, key, f"write the answer as {form}.")]
        )
        _need(
            len(given) == len(values) and all(abs(g - v) < 5e-4 for g, v in zip(given, values, strict=False)),
            f"{key} after one SGD step with lr 0.1 (tolerance 5e-4)",
            "the value torch.optim.SGD gives",
            given,
            "a step subtracts lr times the gradient: parameters move against the gradient.",
        )
    return "w, b and the loss after one step match torch.optim.SGD."


@exercise("appendix_A.4", "CPU against GPU")
def _cpu_against_gpu(answer) -> str:
    form = '{"size": matrix size, "cpu_seconds": float, "gpu_seconds": float or None}'
    size = _number(_field(answer, "size", form), "size", f"write the answer as {form}.")
    flops = 2 * size**3
    timings = {
        "cpu_seconds": _field(answer, "cpu_seconds", form),
        "gpu_seconds": _field(answer, "gpu_seconds", form),
    }
    for key, seconds in timings.items():
        if key == "gpu_seconds" and seconds is None:
            continue
        seconds = _number(seconds, key, f"write the answer as {form}.")
        _need(
            0 < seconds < 120,
            key,
            "seconds per product, between 0 and 2 minutes",
            seconds,
            "give seconds (a millisecond is 0.001), for one product.",
        )
        _need(
            flops / seconds < 5e14,
            f"{key} for a {size:.0f} x {size:.0f} product",
            "at most 500 TFLOP/s (no chip multiplies float32 matrices faster)",
            f"{flops / seconds:.2g} FLOP/s",
            "a GPU call returns before the work is done: synchronize before reading the clock.",
        )
    return "the timings are in seconds and physically possible (a GPU timing includes the work)."


@exercise("appendix_A.5", "sharing data among processes")
def _sharing_data(answer) -> str:
    form = '{"per_process": int, "repeated": int, "per_process_drop_last": int, "left_out_drop_last": int}'
    data = list(range(16))
    facts = {}
    for drop_last in (False, True):
        shares = [
            list(DistributedSampler(data, num_replicas=3, rank=r, seed=0, drop_last=drop_last))
            for r in range(3)
        ]
        drawn = [i for share in shares for i in share]
        suffix = "_drop_last" if drop_last else ""
        facts["per_process" + suffix] = len(shares[0])
        facts["repeated" if not drop_last else "left_out_drop_last"] = (
            len(drawn) - len(set(drawn)) if not drop_last else len(set(data) - set(drawn))
        )
    hints = {
        "per_process": "every process gets the same number: the sampler rounds 16 / 3 up and repeats indices to fill.",
        "repeated": "3 processes x their share, minus the 16 examples, is how many indices are drawn twice.",
        "per_process_drop_last": "with drop_last=True the sampler rounds 16 / 3 down.",
        "left_out_drop_last": "16 minus what the 3 processes draw in all.",
    }
    for key, value in facts.items():
        _need(
            _field(answer, key, form) == value,
            key,
            "what DistributedSampler gives for 16 examples and 3 processes",
            answer[key],
            hints[key],
        )
    return "shares, repeats and the example left out match DistributedSampler."


# ---------------------------------------------------------------------------------------
# Appendix D: warm-up, cosine decay, clipping
# ---------------------------------------------------------------------------------------


@exercise("appendix_D.1", "a floor that holds")
def _floor_that_holds(lr_with_floor) -> str:
    for settings in [
        dict(peak_lr=1e-3, warmup_steps=20, decay_steps=200, floor_fraction=0.1),
        dict(peak_lr=6e-4, warmup_steps=5, decay_steps=50, floor_fraction=0.25),
    ]:
        floor = settings["floor_fraction"] * settings["peak_lr"]
        hints = {
            0: "warm up from the floor, not from 0.",
            settings["warmup_steps"]: "reach the peak when warm-up ends.",
            settings["decay_steps"]: "the cosine ends at the floor at step decay_steps.",
            settings["decay_steps"] + 37: "after decay_steps the rate stays at the floor.",
        }
        for step in sorted(set(range(0, settings["decay_steps"] + 50, 7)) | set(hints)):
            want = lr_at(
                step,
                peak_lr=settings["peak_lr"],
                total_steps=settings["decay_steps"],
                warmup_steps=settings["warmup_steps"],
                initial_lr=floor,
                min_lr=floor,
            )
            got = _number(
                _call(lr_with_floor, f"lr_with_floor({step}, **{settings})", step, **settings),
                f"lr_with_floor({step}, ...)",
                "return the learning rate as a number.",
            )
            _need(
                math.isclose(got, want, rel_tol=1e-6),
                f"lr_with_floor({step}, **{settings})",
                "linear warm-up from the floor, half a cosine to the floor at decay_steps, then the floor",
                got,
                hints.get(
                    step,
                    "between warm-up and decay_steps the rate follows half a cosine from the peak to the floor.",
                ),
            )
    return "warm-up from the floor, the cosine and the floor after decay_steps are right for two settings."


@exercise("appendix_D.2", "clipping by value versus by norm")
def _clipping(answer) -> str:
    form = '{"by_norm": cosine similarity, "by_value": cosine similarity}'
    by_norm = _number(_field(answer, "by_norm", form), "by_norm", f"write the answer as {form}.")
    by_value = _number(_field(answer, "by_value", form), "by_value", f"write the answer as {form}.")
    _need(
        abs(by_norm - 1) < 1e-3,
        "cosine similarity after clipping by norm",
        "1 (within 0.001)",
        by_norm,
        "clipping by norm multiplies every entry by the same factor; compare directions, not lengths.",
    )
    _need(
        -1 <= by_value < 0.99,
        "cosine similarity after clipping by value",
        "clearly below 1",
        by_value,
        "clip at a value that really caps some entries (one giving about the same norm as clipping by norm).",
    )
    return "clipping by norm keeps the direction; clipping by value turns it."


@exercise("appendix_D.3", "warm-up for a larger batch")
def _warmup_for_larger_batch(answer) -> str:
    form = "{4: (warm-up steps, fraction of the run), 8: (...), 16: (...)}"
    text = load_the_verdict()
    train_text = text[: int(0.9 * len(text))]
    for batch_size in (4, 8, 16):
        given = _field(answer, batch_size, form)
        _need(
            isinstance(given, (tuple, list)) and len(given) == 2,
            f"batch {batch_size}",
            "a pair (steps, fraction)",
            given,
            f"write the answer as {form}.",
        )
        steps, fraction = (_number(v, f"batch {batch_size}", f"write the answer as {form}.") for v in given)
        exact = 27 * 2 / batch_size
        _need(
            abs(steps - exact) < 1,
            f"warm-up steps at batch {batch_size} (rounding allowed)",
            "the steps that cover the book's 27 x 2 x 256 warm-up tokens",
            steps,
            "a batch of b rows covers b x 256 tokens per step: larger batches need fewer steps.",
        )
        loader = _windows(train_text, batch_size=batch_size, window=256, stride=256)
        run_steps = 15 * len(loader)
        _need(
            abs(fraction - steps / run_steps) < 0.005,
            f"fraction of a 15-epoch run at batch {batch_size}",
            "your warm-up steps divided by the run's optimizer steps",
            fraction,
            "a run is 15 epochs of the training loader's batches; with drop_last=True an incomplete batch is dropped.",
        )
    return "warm-up steps and their share of the run are right for batches 4, 8 and 16."


@exercise("appendix_D.4", "re-warming")
def _rewarming(answer) -> str:
    form = "the list of the 100 learning rates of the second phase"
    _need(
        isinstance(answer, (list, tuple)) and len(answer) == 100,
        "the answer",
        form,
        f"{type(answer).__name__} of length {len(answer) if hasattr(answer, '__len__') else '?'}",
        "one learning rate per step of the second phase: 10 warm-up steps and 90 decay steps.",
    )
    rates = [_number(rate, "a learning rate", "give numbers.") for rate in answer]
    want = [
        lr_at(step, peak_lr=5e-4, total_steps=100, warmup_steps=10, initial_lr=1e-5, min_lr=1e-5)
        for step in range(100)
    ]
    hints = {
        0: "the second phase starts where the first ended, at min_lr = 1e-5, and counts its steps from 0.",
        10: "warm up to the new peak, 5e-4, over 10 steps.",
    }
    for step in [0, 10] + list(range(100)):
        _need(
            math.isclose(rates[step], want[step], rel_tol=1e-3),
            f"learning rate at step {step} of the second phase",
            "warm-up from 1e-5 to 5e-4 over 10 steps, then half a cosine to 1e-5",
            rates[step],
            hints.get(step, "after the warm-up, decay along half a cosine, as lr_at does."),
        )
    return "the second phase re-warms from 1e-5 to 5e-4 and decays to 1e-5 along a cosine."


# ---------------------------------------------------------------------------------------
# Appendix E: LoRA
# ---------------------------------------------------------------------------------------

# The base models a spam classifier of appendix E starts from (GPT-2 as loaded from OpenAI's weights).
SPAM_BASES = {
    "GPT-2 small": {**GPT_CONFIGS["gpt2-small"], "qkv_bias": True},
    "the stand-in model": STANDIN_CONFIG,
}
PLACEMENTS = {  # answer key -> the targets that placement may use (the head's adapter or not)
    "attention": (("attention",), ("attention", "head")),
    "feed_forward": (("feed_forward",), ("feed_forward", "head")),
    "every_layer": (None,),
}


@functools.cache
def _adapted_layers(
    base: str, targets: tuple[str, ...] | None
) -> tuple[tuple[tuple[str, int, int], ...], int]:
    """((name, d_in, d_out) of each layer apply_lora adapts, the base's parameter count) for a spam classifier."""
    model = make_classifier(build_on_meta(SPAM_BASES[base]))
    total = count_parameters(model)
    lora.apply_lora(model, 1, 1, list(targets) if targets else None)
    layers = tuple((name, m.in_features, m.out_features) for name, m in lora.lora_layers(model).items())
    return layers, total


def _lora_count_hint(given, rank: int, targets_options) -> str:
    """The hint for a wrong count of trainable LoRA parameters: which mistake gives that number."""
    for base in SPAM_BASES:
        for targets in targets_options:
            layers, total = _adapted_layers(base, targets)
            right = rank * sum(d_in + d_out for _, d_in, d_out in layers)
            one_side = {
                rank * sum(d_in for _, d_in, _ in layers),
                rank * sum(d_out for _, _, d_out in layers),
            }
            split = right + rank * sum(2 * d_in for name, d_in, _ in layers if name.endswith("qkv"))
            if given in one_side:
                return "A is d_in x r and B is r x d_out: a rank-r adapter has r (d_in + d_out) parameters, not r x d."
            if given == split:
                return "our attention computes queries, keys and values with one fused layer (att.qkv): one adapter there, not three."
            if given in (total, total + right):
                return "count only the parameters that train (requires_grad=True): the adapters' A and B."
    return "each adapted layer adds r (d_in + d_out) parameters; sum over the layers apply_lora adapts (the 2-class head included)."


def _lora_base(given, rank: int, targets_options, case: str) -> str:
    """The base model whose classifier has ``given`` trainable parameters with rank-``rank`` adapters, or a ✗."""
    for base in SPAM_BASES:
        for targets in targets_options:
            layers, _ = _adapted_layers(base, targets)
            if given == rank * sum(d_in + d_out for _, d_in, d_out in layers):
                return base
    raise Wrong(
        case,
        "what apply_lora leaves trainable on GPT-2 small's or the stand-in's spam classifier",
        given,
        _lora_count_hint(given, rank, targets_options),
    )


def _count_and_accuracy(answer, key, form: str) -> tuple[int | float, float]:
    given = _field(answer, key, form)
    _need(
        isinstance(given, (tuple, list)) and len(given) == 2,
        repr(key),
        "a pair (trainable parameters, test accuracy)",
        given,
        f"write the answer as {form}.",
    )
    count = _number(given[0], f"{key!r}: trainable parameters", f"write the answer as {form}.")
    accuracy = _accuracies({"test accuracy": given[1]}, ("test accuracy",), form)["test accuracy"]
    return (int(count) if count.is_integer() else count), accuracy


@exercise("appendix_E.1", "rank sweep")
def _rank_sweep(answer) -> str:
    form = "{1: (trainable parameters, test accuracy), 16: (...), 64: (...)}"
    results = {rank: _count_and_accuracy(answer, rank, form) for rank in (1, 16, 64)}
    bases = {
        rank: _lora_base(count, rank, (None,), f"trainable parameters at rank {rank}, every linear layer")
        for rank, (count, _) in results.items()
    }
    _need(
        len(set(bases.values())) == 1,
        "the base model of the three runs",
        "the same model for every rank",
        bases,
        "start every run from the same base model.",
    )
    return f"the trainable counts at ranks 1, 16 and 64 match apply_lora on {bases[1]}'s classifier (r (d_in + d_out) per layer)."


@exercise("appendix_E.2", "where to put the adapters")
def _where_to_put(answer) -> str:
    form = (
        '{"attention": (trainable, test accuracy), "feed_forward": (...), "every_layer": (...), "best": key}'
    )
    results = {key: _count_and_accuracy(answer, key, form) for key in PLACEMENTS}
    every = results["every_layer"][0]
    found = [
        (base, round(every / per_rank))
        for base in SPAM_BASES
        if (per_rank := sum(d_in + d_out for _, d_in, d_out in _adapted_layers(base, None)[0]))
        and every % per_rank == 0
        and every > 0
    ]
    _need(
        bool(found),
        "every_layer: trainable parameters",
        "r (d_in + d_out) summed over every linear layer, for some rank r",
        every,
        _lora_count_hint(every, 16, (None,)),
    )
    base, rank = found[0]
    for key in ("attention", "feed_forward"):
        _lora_base(results[key][0], rank, PLACEMENTS[key], f"{key}: trainable parameters at rank {rank}")
    best = max(results, key=lambda key: results[key][1] / results[key][0])
    _need(
        _field(answer, "best", form) == best,
        "best",
        "the placement with the highest test accuracy divided by trainable parameters (from your numbers)",
        answer["best"],
        "divide each accuracy by its number of trainable parameters; the highest accuracy alone is not per parameter.",
    )
    return f"the counts match rank-{rank} adapters on {base}, and {best!r} gives the most accuracy per parameter."


@exercise("appendix_E.3", "alpha")
def _alpha(answer) -> str:
    form = '{"scale": {1: scale, 16: ..., 256: ...}, "lr_at_scale_1": {1: learning rate, 256: ...}}'
    rank, lr = 16, 1e-3
    scales = _field(answer, "scale", form)
    for alpha in (1, 16, 256):
        given = _number(
            _field(scales, alpha, form), f"scale at alpha={alpha}", f"write the answer as {form}."
        )
        _need(
            math.isclose(given, alpha / rank, rel_tol=1e-3),
            f"the adapter's scale at rank {rank}, alpha={alpha}",
            "the factor the update x A B is multiplied by",
            given,
            "LoRA here multiplies by alpha / r (the book's code by alpha alone); alpha = r means scale 1.",
        )
    equivalents = _field(answer, "lr_at_scale_1", form)
    for alpha in (1, 256):
        scale = alpha / rank
        given = _number(
            _field(equivalents, alpha, form),
            f"lr_at_scale_1 for alpha={alpha}",
            f"write the answer as {form}.",
        )
        hint = (
            "Adam divides each gradient by a running estimate of its size: a larger scale does not make larger "
            "steps on A and B, it makes each step count scale times more in the output."
            if math.isclose(given, lr * scale**2, rel_tol=0.05)
            else "a step of A and B moves the output scale times as far: a larger scale acts like a larger learning rate."
        )
        _need(
            math.isclose(given, lr * scale, rel_tol=0.05),
            f"the learning rate at scale 1 that acts like lr {lr:g} at alpha={alpha} (Adam, first order, 5% tolerance)",
            "the learning rate with the same effect per step on the output",
            given,
            hint,
        )
    return "the scales are alpha / r, and with Adam the product scale x learning rate is what matters."


def _tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_classifier(GPTModel(_tiny_config(emb_dim=64, n_layers=2))).eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return classifier_logits(model, ids)


def _tensor_bytes(module: torch.nn.Module, frozen_only: bool = True) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not (frozen_only and t.requires_grad))


@exercise("appendix_E.4", "QLoRA's idea, in int8")
def _int8_base(quantize_with_lora) -> str:
    model = _tiny_classifier()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    float_bytes = sum(_tensor_bytes(m, frozen_only=False) for m in linears.values())
    generator = torch.Generator().manual_seed(1)
    ids, labels = (
        torch.randint(0, 97, (8, 12), generator=generator),
        torch.randint(0, 2, (8,), generator=generator),
    )
    float_logits = _logits(model, ids)
    case = "quantize_with_lora(a 2-block GPT classifier of 64 dims, rank=4, alpha=8)"
    quantized = copy.deepcopy(model)
    count = _call(quantize_with_lora, case, quantized, 4, 8)
    trainable = [p for p in quantized.parameters() if p.requires_grad]
    expected = 4 * sum(m.in_features + m.out_features for m in linears.values())
    _need(
        sum(p.numel() for p in trainable) == expected,
        f"{case}: parameters with requires_grad=True",
        f"{expected:,}: the rank-4 adapters of its {len(linears)} linear layers, nothing else",
        sum(p.numel() for p in trainable),
        "freeze the whole model; only the adapters' A and B train, r (d_in + d_out) per linear layer.",
    )
    _need(
        count == expected,
        f"{case}: the count it returns",
        "the number of trainable parameters",
        count,
        "return the number of parameters with requires_grad=True.",
    )
    int8_bytes = sum(_tensor_bytes(quantized.get_submodule(name)) for name in linears)
    _need(
        int8_bytes <= 0.4 * float_bytes,
        f"{case}: bytes of the frozen tensors in the linear layers",
        f"at most 40% of the {float_bytes:,} bytes they take in float32 (1 byte per weight and a scale per row)",
        int8_bytes,
        "store each weight as int8 with one float scale per output row, and keep no float copy of the weight.",
    )
    adapted_logits = _call(_logits, f"{case}: the logits of the model it returns", quantized, ids)
    without_adapters = copy.deepcopy(quantized)
    with torch.no_grad():
        for param in without_adapters.parameters():
            if param.requires_grad:
                param.zero_()
    added = (adapted_logits - _logits(without_adapters, ids)).abs().max().item()
    _need(
        added <= 1e-6,
        f"{case}: the logits before training, with and without the adapters",
        "the same (the adapters add nothing yet)",
        added,
        "B starts at zero, so a fresh adapter leaves the outputs as they were.",
    )
    moved, size = (adapted_logits - float_logits).abs().max().item(), float_logits.abs().max().item()
    _need(
        moved <= 0.05 * size,
        f"{case}: the largest logit change from quantization",
        f"at most 5% of the largest logit ({size:.3f})",
        moved,
        "round weight / scale to an integer in -127..127 with scale = the row's largest |weight| / 127, and "
        "multiply by the scale again when computing.",
    )
    quantized.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = _call(classification_loss, f"{case}: a training step", ids, labels, quantized, "cpu")
        optimizer.zero_grad()
        _call(loss.backward, f"{case}: loss.backward()")
        optimizer.step()
        losses.append(loss.item())
    _need(
        losses[-1] < losses[0],
        f"{case}: the classification loss over 5 AdamW steps on one batch",
        "falling",
        [round(loss, 4) for loss in losses],
        "the gradient must reach A and B: compute the base product with the dequantized weight inside forward.",
    )
    return f"int8 base ({int8_bytes / float_bytes:.0%} of float32), logits within {moved:.1e}, B = 0 at the start, and the adapters train."


@exercise("appendix_E.5", "train the head, adapt the rest")
def _train_the_head(adapt) -> str:
    model = _tiny_classifier()
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    block_layers = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("trf_blocks")
    ]
    per_rank = sum(m.in_features + m.out_features for m in block_layers)
    head_count = count_parameters(model.out_head)
    case = "adapt_blocks_train_head(a 2-block GPT classifier of 64 dims)"
    count = _call(adapt, case, model)
    head = model.out_head
    _need(
        isinstance(head, torch.nn.Linear),
        f"{case}: the 2-class head",
        "a plain nn.Linear (no adapter)",
        type(head).__name__,
        "leave the head out of the targets: it trains in full, and an adapter on it would count its parameters twice.",
    )
    _need(
        all(p.requires_grad for p in head.parameters()),
        f"{case}: the head's weight and bias",
        "requires_grad=True",
        [p.requires_grad for p in head.parameters()],
        "apply_lora freezes the whole model: make the head trainable after it.",
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = trainable - head_count
    _need(
        adapters > 0 and adapters % per_rank == 0,
        f"{case}: trainable parameters besides the head",
        f"rank r adapters on the blocks' linear layers: r x {per_rank:,}",
        adapters,
        "adapt every linear layer of the blocks (attention and feed-forward) and train nothing else but the head.",
    )
    _need(
        count == trainable,
        f"{case}: the count it returns",
        "the number of trainable parameters",
        count,
        "return the number of parameters with requires_grad=True.",
    )
    moved = (_call(_logits, f"{case}: the logits after adapting", model, ids) - before).abs().max().item()
    _need(
        moved <= 1e-6,
        f"{case}: the logits before training",
        "those of the model before adapting",
        moved,
        "B starts at zero, so adapting alone changes no output.",
    )
    return f"the head trains in full ({head_count} parameters) and rank-{adapters // per_rank} adapters cover the blocks."
