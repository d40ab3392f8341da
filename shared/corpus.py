"""A tokenised text corpus on disk, read through a memory map: built for ch05's pretraining script.

The book's data pipeline reads a text into memory, tokenises it on every run and keeps every
token id (and every training window) in Python lists and tensors, so memory grows with the
corpus. This module does the work once and keeps memory flat:

- :func:`prepare_corpus` streams one text file or a folder of ``.txt`` files through the GPT-2
  tokenizer, block by block, into a flat file of ``uint16`` token ids (documents joined with
  ``<|endoftext|>``), plus a small JSON describing the source files (sizes, sha256 hashes), the
  token count, the tokenizer and the train/validation split. Run again on an unchanged corpus,
  it reuses the files; a changed, added or removed file triggers a rebuild.
- :class:`PreparedCorpus` opens the result; the ids stay on disk and are read through
  ``numpy.memmap`` only where a window is needed.
- :class:`WindowSampler` draws training windows at random positions, where "random" is a pure
  function of ``(seed, step, micro-batch, rank)``: the data position of a run is its step
  number, so a resumed run reads exactly the windows an uninterrupted one would have.
- :func:`fixed_windows` gives evenly spaced windows for evaluation (the same every time).

Memory stays flat because nothing holds more than one block of text (``block_bytes``) and its
ids at a time while preparing, and training touches only the pages of the windows it reads.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from shared.data import data_dir
from shared.tokenizer import get_gpt2_tokenizer
from shared.utils import atomic_path

FORMAT = "llms-corpus/1"
TOKENS_FILE = "tokens.bin"
META_FILE = "corpus.json"
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit in 16 bits: half the disk and page cache of int32
BLOCK_BYTES = 1 << 20  # text read and tokenised at a time

# Where a text may be cut into blocks without changing its tokens: at a single space or newline
# between two visible ASCII characters. GPT-2's pre-tokenizer never joins a word with the
# whitespace after it, and a lone whitespace character between two visible ones always starts a
# new piece (" word", "\n"), so tokenising the two sides separately gives the same ids as
# tokenising the whole. Longer whitespace runs are avoided: their split depends on what follows.
_SAFE_CUT = re.compile(r"(?<=[!-~])[ \n](?=[!-~])")


class CorpusError(ValueError):
    """The corpus cannot be used: no usable text, too few tokens, or a folder that cannot be written."""


# --------------------------------------------------------------------------------------------
# Finding and checking the source files
# --------------------------------------------------------------------------------------------


def find_documents(data: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, files)``: the file itself, or every ``*.txt`` below a folder in sorted order."""
    data = Path(data)
    if data.is_file():
        return data.parent, [data]
    if data.is_dir():
        files = sorted(path for path in data.rglob("*.txt") if path.is_file())
        if not files:
            raise CorpusError(f"the folder {data} holds no .txt files; put the corpus there as UTF-8 .txt files.")
        return data, files
    raise CorpusError(f"{data} does not exist; give a text file or a folder of .txt files.")


@dataclass(frozen=True)
class SourceFile:
    """One document of the corpus as found on disk."""

    name: str  # path relative to the corpus root, with forward slashes
    size: int  # bytes
    sha256: str


def inspect_document(path: Path, root: Path) -> tuple[SourceFile, str | None]:
    """Hash a file in blocks and say what is wrong with it, if anything (empty, not UTF-8 text)."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size, problem = 0, None
    with open(path, "rb") as file:
        while block := file.read(BLOCK_BYTES):
            digest.update(block)
            size += len(block)
            if problem is None:
                if b"\x00" in block:
                    problem = "binary (it contains NUL bytes)"
                else:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as error:
                        problem = f"not UTF-8 text ({error.reason} at byte {size - len(block) + error.start})"
    if problem is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            problem = "not UTF-8 text (it ends inside a character)"
    if problem is None and size == 0:
        problem = "empty"
    name = path.relative_to(root).as_posix() if path != root else path.name
    return SourceFile(name, size, digest.hexdigest()), problem


def scan_corpus(data: str | os.PathLike) -> tuple[Path, list[Path], list[SourceFile], list[dict]]:
    """Check every file: ``(root, usable paths, their SourceFile, skipped [{name, reason}])``.

    Unusable files are skipped with a warning; when none is left, :class:`CorpusError`.
    """
    root, paths = find_documents(data)
    usable_paths, sources, skipped = [], [], []
    for path in paths:
        source, problem = inspect_document(path, root)
        if problem is None:
            usable_paths.append(path)
            sources.append(source)
        else:
            skipped.append({"name": source.name, "reason": problem})
            warnings.warn(f"skipping {path}: {problem}.", stacklevel=2)
    if not sources:
        reasons = "; ".join(f"{entry['name']}: {entry['reason']}" for entry in skipped)
        raise CorpusError(
            f"no usable text in {data}: every file was skipped ({reasons}). The corpus needs UTF-8 text files."
        )
    return root, usable_paths, sources, skipped


# --------------------------------------------------------------------------------------------
# Tokenising in blocks
# --------------------------------------------------------------------------------------------


def _last_safe_cut(text: str) -> int:
    """Index of the last place ``text`` can be cut without changing its tokens, or -1."""
    last = -1
    # Search only the tail: a safe cut is almost always within the last few hundred characters.
    for match in _SAFE_CUT.finditer(text, max(0, len(text) - 65536)):
        last = match.start()
    if last < 0 and len(text) > 65536:
        for match in _SAFE_CUT.finditer(text):
            last = match.start()
    return last


def encode_file(path: Path, tokenizer, block_bytes: int = BLOCK_BYTES, progress=None) -> Iterator[np.ndarray]:
    """The token ids of one UTF-8 file, as arrays, one per block of about ``block_bytes``.

    The concatenation of the arrays equals ``tokenizer.encode_ordinary(whole_text)``: blocks
    are cut only where the tokens do not depend on the cut (see ``_SAFE_CUT``). A text with no
    such place in four blocks in a row (no ASCII spaces at all) is cut anyway, to keep memory
    bounded; the ids then may differ from the whole-text ones at that one place.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    with open(path, "rb") as file:
        while True:
            block = file.read(block_bytes)
            pending += decoder.decode(block, final=not block)
            if progress is not None:
                progress.update(len(block))
            if not block:
                break
            cut = _last_safe_cut(pending)
            if cut <= 0:
                if len(pending.encode("utf-8")) < 4 * block_bytes:
                    continue
                cut = len(pending)
            yield np.asarray(tokenizer.encode_ordinary(pending[:cut]), dtype=TOKEN_DTYPE)
            pending = pending[cut:]
    if pending:
        yield np.asarray(tokenizer.encode_ordinary(pending), dtype=TOKEN_DTYPE)


# --------------------------------------------------------------------------------------------
# Preparing and opening
# --------------------------------------------------------------------------------------------


def _check_written(path: Path, expected_bytes: int) -> None:
    """numpy's ``tofile`` can lose a write on a full disk without an error: compare the sizes."""
    written = path.stat().st_size
    if written != expected_bytes:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: {written} of {expected_bytes} bytes of {TOKENS_FILE} were written",
        )


def _tokenizer_and_name(tokenizer):
    if tokenizer is None:
        tokenizer = get_gpt2_tokenizer()
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise CorpusError(f"the tokenizer has {tokenizer.n_vocab} ids; uint16 storage holds at most 65,536.")
    return tokenizer, {"name": name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_token}


def _choose_validation(sources: list[SourceFile], val_fraction: float) -> int:
    """Index of the first validation document: the last documents, about val_fraction of the bytes.

    With one document there is none (-1): its last tokens are held out instead.
    """
    if len(sources) == 1:
        return -1
    total = sum(source.size for source in sources)
    first, held_out = len(sources), 0
    while first > 1 and held_out < val_fraction * total:  # at least one document stays for training
        first -= 1
        held_out += sources[first].size
    return first


def fingerprint_of(meta: dict) -> str:
    """A short hash of what the tokens depend on: the sources, the tokenizer and the split."""
    identity = {key: meta[key] for key in ("format", "sources", "tokenizer", "val_fraction")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def default_prepared_dir(data: str | os.PathLike) -> Path:
    """``<data>.tokens`` beside the file or folder."""
    data = Path(data)
    return data.with_name(data.name + ".tokens")


def choose_prepared_dir(data: str | os.PathLike, chosen: str | os.PathLike | None = None) -> Path:
    """``chosen``, else ``<data>.tokens`` beside the data, else (read-only data) a folder in the course's data folder."""
    if chosen:
        return Path(chosen)
    beside = default_prepared_dir(data)
    if beside.is_dir() or os.access(beside.parent, os.W_OK):
        return beside
    tag = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:8]
    return data_dir() / "prepared-corpora" / f"{beside.name}-{tag}"


def prepare_for_training(
    data: str | os.PathLike, prepared_dir=None, *, val_fraction: float = 0.1, progress: bool = True
) -> PreparedCorpus:
    """:func:`prepare_corpus` once per training run: under ``torch.distributed`` rank 0 prepares
    (or reuses) the corpus while the other processes wait, then they open what it wrote.

    ``prepared_dir`` None: see :func:`choose_prepared_dir`. Rank 0 prints what it found.
    """
    folder = choose_prepared_dir(data, prepared_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        started = time.perf_counter()
        corpus = prepare_corpus(data, folder, val_fraction=val_fraction, progress=progress)
        how = "reused" if corpus.reused else f"prepared in {time.perf_counter() - started:.1f} s"
        train, val = corpus.train[1] - corpus.train[0], corpus.val[1] - corpus.val[0]
        print(f"corpus: {corpus.num_tokens:,} tokens ({how}) in {corpus.folder}; train {train:,}, "
              f"validation {val:,}", flush=True)  # fmt: skip
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        if rank != 0:
            corpus = PreparedCorpus.open(folder)
    return corpus


def prepare_corpus(
    data: str | os.PathLike,
    prepared_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    tokenizer=None,
    block_bytes: int = BLOCK_BYTES,
    progress: bool = True,
) -> PreparedCorpus:
    """Tokenise ``data`` (a text file or a folder of ``.txt`` files) into ``prepared_dir`` once.

    Reuses an earlier preparation when the sources (names, sizes, hashes), the tokenizer and
    ``val_fraction`` are unchanged; otherwise rebuilds. Empty or non-UTF-8 files are skipped
    with a warning. The files are written under temporary names and renamed at the end, so an
    interrupted preparation leaves nothing that looks finished.
    """
    if not 0 < val_fraction < 1:
        raise CorpusError(f"val_fraction must be between 0 and 1, got {val_fraction}.")
    prepared_dir = Path(prepared_dir) if prepared_dir is not None else default_prepared_dir(data)
    tokenizer, tokenizer_info = _tokenizer_and_name(tokenizer)
    root, paths, sources, skipped = scan_corpus(data)
    meta = {
        "format": FORMAT,
        "sources": [source.__dict__ for source in sources],
        "tokenizer": tokenizer_info,
        "val_fraction": val_fraction,
    }
    fingerprint = fingerprint_of(meta)
    try:
        existing = PreparedCorpus.open(prepared_dir)
        if existing.fingerprint == fingerprint:
            existing.reused = True
            return existing
    except CorpusError:
        pass  # nothing prepared yet, or a different / unfinished preparation: rebuild

    first_val = _choose_validation(sources, val_fraction)
    eot = np.asarray([tokenizer.eot_token], dtype=TOKEN_DTYPE)
    num_tokens, val_start, documents = 0, None, []
    bar = tqdm(
        total=sum(s.size for s in sources), unit="B", unit_scale=True, desc="tokenising", disable=not progress
    )
    try:
        prepared_dir.mkdir(parents=True, exist_ok=True)
        # From here on the old preparation is void: without its description it is never reused.
        (prepared_dir / META_FILE).unlink(missing_ok=True)
        for stale in prepared_dir.glob(f".{TOKENS_FILE}.*.part"):  # left by a killed preparation
            stale.unlink(missing_ok=True)
        # atomic_path renames the finished file into place; an error deletes the partial one.
        with atomic_path(prepared_dir / TOKENS_FILE) as tmp_tokens, open(tmp_tokens, "wb") as out:
            for index, path in enumerate(paths):
                if index > 0:  # documents are joined with <|endoftext|>
                    eot.tofile(out)
                    num_tokens += 1
                if index == first_val:
                    val_start = num_tokens
                start = num_tokens
                for ids in encode_file(path, tokenizer, block_bytes, progress=bar):
                    ids.tofile(out)
                    num_tokens += len(ids)
                documents.append([start, num_tokens])
            out.flush()
            os.fsync(out.fileno())
            _check_written(tmp_tokens, num_tokens * eot.itemsize)
        if val_start is None:  # one document: hold out its last tokens
            val_start = num_tokens - max(1, math.ceil(val_fraction * num_tokens))
        meta.update(
            fingerprint=fingerprint,
            num_tokens=num_tokens,
            val_start=val_start,
            documents=documents,
            skipped=skipped,
        )
        with atomic_path(prepared_dir / META_FILE) as tmp_meta:
            tmp_meta.write_text(json.dumps(meta, indent=1))
    except OSError as error:
        raise CorpusError(
            f"cannot write the prepared corpus to {prepared_dir} ({error}); choose a writable folder "
            "with enough space (--prepared-dir in ch05/pretrain.py)."
        ) from error
    finally:
        bar.close()
    corpus = PreparedCorpus.open(prepared_dir)
    corpus.reused = False
    return corpus


class PreparedCorpus:
    """A prepared corpus folder: ``tokens.bin`` (uint16 ids) and ``corpus.json`` (its description).

    ``train`` and ``val`` are ``(start, end)`` token ranges; the ids themselves are read with
    :meth:`tokens`, a read-only memory map.
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.reused: bool | None = None  # set by prepare_corpus

    @classmethod
    def open(cls, folder: str | os.PathLike) -> PreparedCorpus:
        folder = Path(folder)
        meta_path, tokens_path = folder / META_FILE, folder / TOKENS_FILE
        if not meta_path.is_file() or not tokens_path.is_file():
            raise CorpusError(f"{folder} holds no prepared corpus (run prepare_corpus first).")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CorpusError(f"{meta_path} is unreadable ({error}); delete {folder} to prepare again.") from error
        if meta.get("format") != FORMAT:
            raise CorpusError(f"{meta_path} is not a {FORMAT} description; delete {folder} to prepare again.")
        expected = meta["num_tokens"] * np.dtype(TOKEN_DTYPE).itemsize
        if tokens_path.stat().st_size != expected:
            raise CorpusError(
                f"{tokens_path} has {tokens_path.stat().st_size} bytes, but {meta_path} promises {expected}; "
                f"delete {folder} to prepare again."
            )
        return cls(folder, meta)

    @property
    def tokens_path(self) -> Path:
        return self.folder / TOKENS_FILE

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    @property
    def train(self) -> tuple[int, int]:
        return 0, self.meta["val_start"]

    @property
    def val(self) -> tuple[int, int]:
        return self.meta["val_start"], self.meta["num_tokens"]

    def tokens(self) -> np.memmap:
        """All ids as a read-only memory map (nothing is read until it is indexed)."""
        return np.memmap(self.tokens_path, dtype=TOKEN_DTYPE, mode="r", shape=(self.num_tokens,))

    def check_fits(self, context_length: int) -> None:
        """Raise :class:`CorpusError` unless both splits hold at least one window of context_length + 1."""
        need = context_length + 1
        sizes = {name: end - start for name, (start, end) in (("training", self.train), ("validation", self.val))}
        short = {name: size for name, size in sizes.items() if size < need}
        if short:
            raise CorpusError(
                f"the corpus is too small for a context length of {context_length}: one window needs "
                f"{need} tokens, but the {' and '.join(f'{n} split has {s}' for n, s in short.items())} "
                f"(corpus: {self.num_tokens} tokens). Use more text, a smaller --context-length, or "
                "another --val-fraction."
            )


# --------------------------------------------------------------------------------------------
# Reading windows
# --------------------------------------------------------------------------------------------


def read_windows(tokens_path: Path, num_tokens: int, starts, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (len(starts), context_length) int64, from the windows at ``starts``.

    The file is mapped for this call only: unmapping it afterwards gives the touched pages
    back, so resident memory holds one batch's pages, not every page ever read.
    """
    tokens = np.memmap(tokens_path, dtype=TOKEN_DTYPE, mode="r", shape=(num_tokens,))
    rows = np.stack([tokens[start : start + context_length + 1] for start in starts]).astype(np.int64)
    del tokens
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


class WindowSampler:
    """Random training windows whose positions depend only on ``(seed, step, micro, rank)``.

    A window is ``context_length + 1`` consecutive ids starting anywhere in ``[start, end)``
    (windows may overlap and repeat: sampling with replacement, as GPT-2-style pretraining
    scripts do). Because no state is carried from one batch to the next, the data position of
    a run is just its step number; under data-parallel training each rank draws its own windows.
    """

    def __init__(
        self,
        corpus: PreparedCorpus,
        split: str,
        context_length: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
    ):
        corpus.check_fits(context_length)
        self.tokens_path, self.num_tokens = corpus.tokens_path, corpus.num_tokens
        self.start, self.end = corpus.train if split == "train" else corpus.val
        self.context_length, self.batch_size, self.seed, self.rank = context_length, batch_size, seed, rank

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        # SeedSequence mixes all four numbers into one well-spread seed; no two combinations collide.
        rng = np.random.default_rng([self.seed, step, micro, self.rank])
        return rng.integers(self.start, self.end - self.context_length, size=self.batch_size)

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return read_windows(self.tokens_path, self.num_tokens, self.starts(step, micro), self.context_length)


def fixed_windows(span: tuple[int, int], context_length: int, count: int) -> np.ndarray:
    """``count`` window starts spread evenly over ``span``: the same evaluation windows every time."""
    start, end = span
    last = end - context_length - 1
    if last < start:
        raise CorpusError(f"the span {span} holds no window of {context_length + 1} tokens.")
    return np.unique(np.linspace(start, last, num=count).round().astype(np.int64))
