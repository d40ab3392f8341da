"""Tokenizers: the chapter-2 word-level tokenizers and GPT-2's byte-pair encoding through
tiktoken (the byte-pair encoder written from scratch is in :mod:`shared.bpe`).

Also what every later module needs to know about token ids: GPT-2's vocabulary size and
end-of-text id (:data:`GPT2_VOCAB_SIZE`, :data:`GPT2_EOT_ID`, defined here once) and
:func:`check_token_ids`, the check that ids are integers inside a vocabulary, used by the
datasets (ch02), the model (ch04) and generation.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from shared import data
from shared.download import DownloadError, sha256_of
from shared.utils import atomic_path

# GPT-2's vocabulary: 50,256 byte-pair tokens plus <|endoftext|>, the last id. The course pads,
# ends responses and separates documents with that id.
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256


class TokenizerFilesError(RuntimeError):
    """The GPT-2 tokenizer files could not be found or fetched."""


# Where tiktoken's "gpt2" encoding reads its two files from. tiktoken caches each download in
# $TIKTOKEN_CACHE_DIR under the sha1 of its URL, and reads the cached copy when its sha256 is right.
TIKTOKEN_GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = ("encoder.json", "vocab.bpe")
# Seconds to wait for a server before giving up on a try (two tries per file). tiktoken's own
# download has no time limit at all: on a network that accepts connections but never answers
# it would wait forever, so it is never left to download anything.
GPT2_FILES_TIMEOUT = 15.0


def _fetch_gpt2_file(name: str) -> Path:
    """``<data dir>/gpt2-tokenizer/<name>``, downloaded (mirror-aware, bounded time) if missing."""
    return data.fetch(f"gpt2-tokenizer/{name}", timeout=GPT2_FILES_TIMEOUT, retries=2)


def _fill_tiktoken_cache(cache_dir: Path) -> bool:
    """Put GPT-2's files into tiktoken's cache, so that tiktoken finds them and downloads nothing.

    Files already cached with the right sha256 are kept; missing ones are copied from the data
    directory (fetched there first if needed). Returns False when the cache cannot be written.
    """
    for name in GPT2_FILES:
        cached = cache_dir / hashlib.sha1((TIKTOKEN_GPT2_BASE_URL + name).encode()).hexdigest()
        if cached.is_file() and sha256_of(cached) == data.REMOTE_FILES[f"gpt2-tokenizer/{name}"].sha256:
            continue
        source = _fetch_gpt2_file(name)
        try:
            with atomic_path(cached) as tmp:
                shutil.copyfile(source, tmp)
        except OSError:
            return False
    return True


def _encoding_from_data_dir():
    """tiktoken's GPT-2 encoding built from encoder.json and vocab.bpe in the data directory."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(_fetch_gpt2_file("vocab.bpe")),
        encoder_json_file=str(_fetch_gpt2_file("encoder.json")),
    )
    # The same specification tiktoken registers for "gpt2", with the ranks read locally.
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT_ID},
    )


@functools.lru_cache(maxsize=1)
def get_gpt2_tokenizer():
    """GPT-2's tokenizer, ``tiktoken.get_encoding("gpt2")``, usable offline and never hanging.

    tiktoken keeps its files in ``$TIKTOKEN_CACHE_DIR``; when that is unset we point it at
    ``<data dir>/tiktoken-cache`` so all downloads share one folder. tiktoken is never left to
    download: missing files are fetched into ``<data dir>/gpt2-tokenizer/`` by
    :func:`shared.data.fetch` (a time limit per try, ``LLMS_OPENAI_BASE_URL`` for a mirror, a
    data directory prepared by hand) and copied into tiktoken's cache. When the cache is
    disabled (``TIKTOKEN_CACHE_DIR=""``) or cannot be written, the same encoding is built from
    the data directory's copies. When the files cannot be had, :class:`TokenizerFilesError`
    says how to provide them.
    """
    import tiktoken

    cache_dir = os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data.data_dir() / "tiktoken-cache"))
    try:
        if cache_dir and _fill_tiktoken_cache(Path(cache_dir)):
            return tiktoken.get_encoding("gpt2")
        return _encoding_from_data_dir()
    except DownloadError as error:
        raise TokenizerFilesError(
            f"Could not load the GPT-2 tokenizer: {error}\n"
            "To work offline, copy encoder.json and vocab.bpe (from "
            f"{TIKTOKEN_GPT2_BASE_URL}) into {data.data_dir() / 'gpt2-tokenizer'}, or set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies of them."
        ) from error


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as plain text: "<|endoftext|>" written inside data is not the special token.

    tiktoken refuses such text by default; SMS messages (ch06) and instruction entries (ch07)
    are data, so it is encoded like any other characters.
    """
    try:
        return tokenizer.encode(text, disallowed_special=())
    except TypeError:  # a tokenizer without tiktoken's keyword (e.g. the ch02 BPE) has no specials
        return tokenizer.encode(text)


def check_token_ids(
    idx: torch.Tensor, vocab_size: int | None, what: str = "token ids", *, check_range: bool = True
) -> None:
    """Raise ValueError unless ``idx`` holds integer ids in ``[0, vocab_size)``.

    One min/max over the tensor, not a Python loop: cheap next to a forward pass, and it turns
    an index error deep inside the embedding (on a GPU, a device-side assert that kills the
    process) into a message that says which id is wrong. Reading the min and max back makes the
    host wait for the tensor's device; ``check_range=False`` checks the dtype only.
    """
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(
            f"{what} must be integers, got a tensor of dtype {idx.dtype}; token ids come from a "
            "tokenizer, and converting floats would silently round them."
        )
    if idx.numel() == 0 or not check_range:
        return
    low, high = torch.aminmax(idx)
    low, high = int(low), int(high)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        limit = f"0 to {vocab_size - 1}" if vocab_size is not None else "0 upwards"
        raise ValueError(
            f"{what} contain {bad}, outside the vocabulary (ids run from {limit}); was the text "
            "encoded with a different tokenizer than the model's?"
        )


# ---------------------------------------------------------------------------------------
# Chapter 2, step 1: splitting on a regular expression and a word-level vocabulary
# ---------------------------------------------------------------------------------------

# Punctuation, double dashes and whitespace are split off as separate pieces; the capture
# group keeps the punctuation in the output of re.split.
SIMPLE_SPLIT_PATTERN = re.compile(r'([,.:;?_!"()\']|--|\s)')

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"


def simple_split(text: str) -> list[str]:
    """Words and punctuation of ``text``, whitespace dropped (the chapter's first tokenizer)."""
    return [piece.strip() for piece in SIMPLE_SPLIT_PATTERN.split(text) if piece.strip()]


def build_vocab(text_or_tokens, special_tokens=()) -> dict[str, int]:
    """A word-level vocabulary: every distinct token in sorted order, then ``special_tokens``.

    ``text_or_tokens`` is raw text (split with :func:`simple_split`) or a list of tokens.
    """
    tokens = simple_split(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
    words = sorted(set(tokens) - set(special_tokens))
    return {token: token_id for token_id, token in enumerate([*words, *special_tokens])}


# How decode puts spaces back between tokens. Whitespace was thrown away by the split, so
# these rules recreate ordinary English spacing; newlines and double spaces cannot come back.
_NO_SPACE_BEFORE = {",", ".", ":", ";", "?", "!", ")", "--", "'"}
_NO_SPACE_AFTER = {"(", "--"}
_CONTRACTION_ENDINGS = {"s", "t", "re", "ve", "ll", "d", "m"}  # it's, don't, we're, I've, ...
_PAIRED_MARKS = {'"', "_"}  # quotes and _italics_: the first of a pair opens, the second closes


def _join_with_spaces(tokens: list[str]) -> str:
    pieces: list[str] = []
    open_marks: set[str] = set()
    glue_next = True  # no space before the very first token
    for position, token in enumerate(tokens):
        if token in _PAIRED_MARKS and token in open_marks:  # a closing mark hugs the word before it
            open_marks.discard(token)
            pieces.append(token)
            glue_next = False
            continue
        if not glue_next and token not in _NO_SPACE_BEFORE:
            pieces.append(" ")
        pieces.append(token)
        if token in _PAIRED_MARKS:  # an opening mark hugs the word after it
            open_marks.add(token)
            glue_next = True
        elif token == "'":  # glue "it ' s" back into "it's", but keep "weeks' idling"
            following = tokens[position + 1] if position + 1 < len(tokens) else ""
            glue_next = following in _CONTRACTION_ENDINGS
        else:
            glue_next = token in _NO_SPACE_AFTER
    return "".join(pieces)


class SimpleTokenizerV1:
    """Word-level tokenizer: text -> ids through a fixed vocabulary; unknown words are an error."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {token_id: token for token, token_id in vocab.items()}

    def _id_of(self, token: str) -> int:
        try:
            return self.str_to_int[token]
        except KeyError:
            raise KeyError(
                f"{token!r} is not in the vocabulary ({len(self.str_to_int)} entries). Build the "
                f"vocabulary from text that contains it, or use SimpleTokenizerV2, which maps "
                f"unknown words to {UNKNOWN}."
            ) from None

    def encode(self, text: str) -> list[int]:
        return [self._id_of(token) for token in simple_split(text)]

    def decode(self, ids) -> str:
        try:
            tokens = [self.int_to_str[int(token_id)] for token_id in ids]
        except KeyError as missing:
            raise ValueError(
                f"token id {missing.args[0]} is not in the vocabulary (ids run from 0 to "
                f"{len(self.int_to_str) - 1})"
            ) from None
        return _join_with_spaces(tokens)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """Like V1, but unknown words become ``<|unk|>``; documents are joined with ``<|endoftext|>``.

    The vocabulary must contain both special tokens (``build_vocab(text, [END_OF_TEXT, UNKNOWN])``).
    """

    def __init__(self, vocab: dict[str, int]):
        missing = [token for token in (END_OF_TEXT, UNKNOWN) if token not in vocab]
        if missing:
            raise ValueError(
                f"SimpleTokenizerV2 needs the special tokens {missing} in its vocabulary; build it "
                f"with build_vocab(text, special_tokens=[{END_OF_TEXT!r}, {UNKNOWN!r}])"
            )
        super().__init__(vocab)

    def _id_of(self, token: str) -> int:
        return self.str_to_int.get(token, self.str_to_int[UNKNOWN])

    @staticmethod
    def join_documents(documents) -> str:
        """One text from several documents, each boundary marked with ``<|endoftext|>``."""
        return f" {END_OF_TEXT} ".join(documents)
