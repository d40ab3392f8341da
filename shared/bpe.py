"""Byte-level byte-pair encoding (GPT-2's scheme), written from scratch: trainable on any
text, loadable from GPT-2's own ``encoder.json`` and ``vocab.bpe``, and saved as one JSON file."""

from __future__ import annotations

import collections
import functools
import heapq
import json
from itertools import chain, pairwise
from pathlib import Path

import regex

from shared import data
from shared.tokenizer import END_OF_TEXT
from shared.utils import atomic_path

# GPT-2's pre-tokenisation: contractions, runs of letters, runs of digits, runs of other
# symbols (each optionally led by one space), then whitespace. Merges never cross these
# pieces, so " the" and "the" are learned as separate tokens but "the." never is. The
# possessive quantifiers (++) match what tiktoken uses; they change speed, not the result.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each of the 256 byte values to a printable character.

    Bytes that are already printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the other 68 (controls, space, ...) map to the characters from U+0100 up, in
    byte order. So a space is written ``Ġ`` (U+0120) and a newline ``Ċ`` in GPT-2's files.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def _token_to_text(token: bytes) -> str:
    """A token's bytes in GPT-2's printable form (as in encoder.json)."""
    table = bytes_to_unicode()
    return "".join(table[byte] for byte in token)


def _text_to_token(text: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in text)
    except KeyError as missing:
        raise ValueError(f"{text!r} holds {missing.args[0]!r}, which is not in GPT-2's byte map") from None


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``ids`` with every occurrence of ``pair`` (left to right, not overlapping) replaced by ``new_id``."""
    first, second = pair
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == first and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


class BPETokenizer:
    """Byte-level byte-pair encoding, the scheme of GPT-2.

    Text is cut into pieces by :data:`GPT2_SPLIT_PATTERN`, each piece is turned into its UTF-8
    bytes (one token per byte to start with), and learned merges join adjacent tokens into
    longer ones, earliest-learned merge first. Any text can be encoded (there is no unknown
    word) and decoding gives back the exact text.

    - ``BPETokenizer()`` knows only the 256 bytes; :meth:`train` learns merges from text.
    - :meth:`from_gpt2_files` loads GPT-2's ``encoder.json`` and ``vocab.bpe`` and then
      encodes exactly as ``tiktoken.get_encoding("gpt2")`` does.
    - :meth:`save` / :meth:`load` keep a tokenizer in one JSON file.
    """

    def __init__(self, vocab=None, merges=(), special_tokens=None, pattern: str = GPT2_SPLIT_PATTERN):
        """``vocab``: id -> token bytes (default: byte ``b`` has id ``b``); ``merges``: the
        ``(left_id, right_id)`` pairs in the order learned, each must have its joined bytes in
        ``vocab``; ``special_tokens``: text -> id, for markers such as ``<|endoftext|>``."""
        vocab = {byte: bytes([byte]) for byte in range(256)} if vocab is None else dict(vocab)
        self._set_up(vocab, list(merges), dict(special_tokens or {}), pattern)

    def _set_up(self, vocab: dict[int, bytes], merges, special_tokens: dict[str, int], pattern: str):
        _check_special_token_texts(special_tokens)
        # self.vocab maps every id to its bytes, special tokens included (as their UTF-8 text).
        special_bytes = {token_id: text.encode("utf-8") for text, token_id in special_tokens.items()}
        clashes = sorted(i for i, token in special_bytes.items() if vocab.get(i, token) != token)
        if clashes:
            raise ValueError(f"special token ids {clashes} are already used by ordinary tokens")
        ordinary = {token_id: token for token_id, token in vocab.items() if token_id not in special_bytes}
        self.vocab = {**ordinary, **special_bytes}
        self.special_tokens = special_tokens
        self.pattern = pattern
        self._compiled_pattern = regex.compile(pattern)

        id_of_bytes = {token: token_id for token_id, token in ordinary.items()}
        missing = [byte for byte in range(256) if bytes([byte]) not in id_of_bytes]
        if missing:
            raise ValueError(f"a byte-level vocabulary needs all 256 single bytes; missing {missing[:10]}")
        self._byte_ids = [id_of_bytes[bytes([byte])] for byte in range(256)]

        # merges: (left id, right id) -> id of the joined token; _merge_rank: the same pairs ->
        # the order in which they were learned (encoding applies the lowest rank first).
        self.merges: dict[tuple[int, int], int] = {}
        self._merge_rank: dict[tuple[int, int], int] = {}
        for rank, (left, right) in enumerate(merges):
            joined = ordinary.get(left, b"") + ordinary.get(right, b"")
            if left not in ordinary or right not in ordinary or joined not in id_of_bytes:
                raise ValueError(f"merge #{rank} {(left, right)} joins tokens that are not in the vocabulary")
            self.merges[(left, right)] = id_of_bytes[joined]
            self._merge_rank[(left, right)] = rank

        self._special_pattern_cache: dict[frozenset, regex.Pattern] = {}
        self._piece_cache: dict[str, list[int]] = {}

    # -- sizes ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids in use: ordinary tokens plus special tokens."""
        return len(self.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={sorted(self.special_tokens)})"
        )

    # -- training ------------------------------------------------------------------------

    def train(
        self, text: str, vocab_size: int, allowed_special=frozenset({END_OF_TEXT}), verbose: bool = False
    ) -> BPETokenizer:
        """Learn merges from ``text`` until the vocabulary holds ``vocab_size`` ids; returns self.

        ``vocab_size`` counts the 256 bytes, the merges and the special tokens. Special tokens
        (``allowed_special``; by default ``{"<|endoftext|>"}`` as in GPT-2, ``()`` for none) get
        the last ids; where they occur in ``text`` they are cut out, so no merge spans them. Training starts from bytes again
        (earlier merges are forgotten), and stops early when no adjacent pair is left to merge.

        Each step merges the most frequent adjacent pair; ties go to the pair with the smallest
        ids, so training is deterministic. Pair counts are updated only for the pieces that
        contain the merged pair, instead of being recounted over the whole text each step.
        ``verbose=True`` prints each merge as it is learned.
        """
        if allowed_special == "all":
            raise ValueError(
                'allowed_special="all" has no meaning before training: name the special tokens to '
                'add, e.g. allowed_special={"<|endoftext|>"}'
            )
        specials = sorted(_as_token_set(allowed_special))
        if vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the 256 byte tokens and {len(specials)} special "
                f"token(s) need at least {256 + len(specials)}"
            )
        pieces = []
        for chunk in self._split_on_specials(text, specials):
            if chunk not in specials:
                pieces.extend(self._compiled_pattern.findall(chunk))
        piece_counts = collections.Counter(pieces)

        vocab = {byte: bytes([byte]) for byte in range(256)}
        merges = _learn_merges(piece_counts, vocab, vocab_size - len(specials), verbose)
        special_tokens = {token: len(vocab) + offset for offset, token in enumerate(specials)}
        self._set_up(vocab, merges, special_tokens, self.pattern)
        return self

    # -- encoding ------------------------------------------------------------------------

    def _encode_piece(self, piece: bytes) -> list[int]:
        """Merge the bytes of one pre-token, always applying the earliest-learned merge first."""
        ids = [self._byte_ids[byte] for byte in piece]
        ranks = self._merge_rank
        while len(ids) > 1:
            best = min(pairwise(ids), key=lambda pair: ranks.get(pair, _NEVER))
            if best not in ranks:
                break
            ids = _merge_pair(ids, best, self.merges[best])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token strings treated as plain text."""
        pieces = self._compiled_pattern.findall(text)
        cache = self._piece_cache
        if len(cache) > _PIECE_CACHE_LIMIT:  # bound memory on very varied text
            cache.clear()
        # Text repeats its pieces (" the", ",", ...): run BPE once per distinct new piece,
        # then build the output from cached look-ups alone.
        for piece in set(pieces).difference(cache):
            cache[piece] = self._encode_piece(piece.encode("utf-8"))
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Token ids of ``text``, with the same special-token rules as tiktoken.

        - ``allowed_special``: special tokens (or ``"all"``) encoded as their single id.
        - ``disallowed_special``: special tokens (default ``"all"`` not allowed) whose text in
          ``text`` raises a ValueError, since usually it came from data, not from you. Pass
          ``disallowed_special=()`` to encode such text as ordinary characters.
        """
        allowed_special = (
            set(self.special_tokens) if allowed_special == "all" else _as_token_set(allowed_special)
        )
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - allowed_special
        unknown = allowed_special - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"{sorted(unknown)} are not special tokens of this tokenizer: {sorted(self.special_tokens)}"
            )
        for token in disallowed_special:
            if token in text:
                raise ValueError(
                    f"the text contains the special token {token!r}. Pass allowed_special={{{token!r}}} "
                    f"to encode it as its id, or disallowed_special=() to encode it as plain text."
                )
        if not allowed_special:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for chunk in self._split_on_specials(text, allowed_special):
            if chunk in allowed_special:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def _split_on_specials(self, text: str, specials) -> list[str]:
        """``text`` cut around each occurrence of the strings in ``specials`` (kept as pieces)."""
        if not specials:
            return [text]
        key = frozenset(specials)
        pattern = self._special_pattern_cache.get(key)
        if pattern is None:
            # Longest first, so that a special token that contains another wins.
            alternatives = "|".join(regex.escape(token) for token in sorted(key, key=len, reverse=True))
            pattern = self._special_pattern_cache[key] = regex.compile(f"({alternatives})")
        return [chunk for chunk in pattern.split(text) if chunk]

    # -- decoding ------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes behind ``ids`` (a token may hold part of a multi-byte character)."""
        chunks = []
        for token_id in ids:
            token_id = int(token_id)
            chunk = self.vocab.get(token_id)
            if chunk is None:
                raise ValueError(
                    f"token id {token_id} is not in this tokenizer (vocab_size={self.vocab_size})"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def decode(self, ids) -> str:
        """Text of ``ids``. Bytes that are not valid UTF-8 on their own (say, half an emoji when
        ``ids`` is cut mid-character) become U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """One token shown readably: its text, or GPT-2's printable form when it is not valid UTF-8."""
        chunk = self.decode_bytes([token_id])
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError:
            return _token_to_text(chunk)

    # -- GPT-2's files and our own -------------------------------------------------------

    @classmethod
    def _from_printable(cls, encoder: dict[str, int], merge_lines, special_tokens, pattern) -> BPETokenizer:
        """Build from an encoder.json-style table (printable token -> id), "left right" merge
        lines in the order learned, and the special tokens (text -> id)."""
        vocab = {token_id: _text_to_token(text) for text, token_id in encoder.items()}
        merges = []
        for line_number, line in enumerate(merge_lines, start=1):
            parts = line.split(" ")
            if len(parts) != 2 or not all(part in encoder for part in parts):
                raise ValueError(
                    f"merge line {line_number} ({line!r}) should be two tokens of the vocabulary, "
                    "separated by one space"
                )
            merges.append((encoder[parts[0]], encoder[parts[1]]))
        return cls(vocab, merges, special_tokens, pattern)

    @classmethod
    def from_gpt2_files(cls, encoder_json=None, vocab_bpe=None) -> BPETokenizer:
        """GPT-2's tokenizer from its ``encoder.json`` (token -> id) and ``vocab.bpe`` (the 50,000
        merges in order). Without arguments both are fetched into the data directory through
        :func:`shared.data.fetch`."""
        encoder_json = encoder_json or data.fetch("gpt2-tokenizer/encoder.json")
        vocab_bpe = vocab_bpe or data.fetch("gpt2-tokenizer/vocab.bpe")
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        # GPT-2 has one special token, stored among the ordinary ones in encoder.json.
        special_tokens = {END_OF_TEXT: encoder.pop(END_OF_TEXT)} if END_OF_TEXT in encoder else {}
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merge_lines = [line for line in lines if line and not line.startswith("#version")]
        return cls._from_printable(encoder, merge_lines, special_tokens, GPT2_SPLIT_PATTERN)

    def save(self, path) -> Path:
        """Write the tokenizer to one JSON file: the pattern, every token in GPT-2's printable
        form (like encoder.json), the merges as "left right" lines (like vocab.bpe) and the
        special tokens. Human-readable, and loading it runs no code (unlike pickle)."""
        path = Path(path)
        merges_by_rank = sorted(self._merge_rank, key=self._merge_rank.get)
        special_ids = set(self.special_tokens.values())
        document = {
            "format": _SAVE_FORMAT,
            "pattern": self.pattern,
            "vocab": {
                _token_to_text(token): token_id
                for token_id, token in sorted(self.vocab.items())
                if token_id not in special_ids
            },
            "merges": [
                f"{_token_to_text(self.vocab[left])} {_token_to_text(self.vocab[right])}"
                for left, right in merges_by_rank
            ],
            "special_tokens": self.special_tokens,
        }
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> BPETokenizer:
        """A tokenizer written by :meth:`save`.

        A file that is not one (truncated, another JSON document, ids stored as strings, ...)
        raises one ValueError that names the file and what is wrong with it.
        """
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is not a tokenizer saved by BPETokenizer.save: it is not valid JSON ({error}); "
                "it may be truncated. Save the tokenizer again."
            ) from None
        problem = _problem_with_saved(document)
        if problem is None:
            try:
                return cls._from_printable(
                    document["vocab"], document["merges"], document["special_tokens"], document["pattern"]
                )
            except (ValueError, regex.error) as error:
                problem = str(error)
        raise ValueError(f"{path} is not a tokenizer saved by BPETokenizer.save: {problem}.")


def _problem_with_saved(document) -> str | None:
    """What is wrong with the structure of a saved tokenizer, or None when it looks right."""
    if not isinstance(document, dict) or document.get("format") != _SAVE_FORMAT:
        return f"expected a JSON object with format {_SAVE_FORMAT!r}"
    expected = {"pattern": str, "vocab": dict, "merges": list, "special_tokens": dict}
    for key, kind in expected.items():
        if not isinstance(document.get(key), kind):
            return f"{key!r} should be a JSON {'string' if kind is str else kind.__name__}, found {document.get(key)!r:.60}"
    for key in ("vocab", "special_tokens"):
        for text, token_id in document[key].items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                return f"{key} maps {text!r} to {token_id!r}, but ids must be integers >= 0"
    if not all(isinstance(line, str) for line in document["merges"]):
        return "every merge should be a string of two tokens separated by one space"
    return None


def _as_token_set(tokens) -> set[str]:
    """A set of special-token strings; one string counts as one token, not as its characters."""
    tokens = {tokens} if isinstance(tokens, str) else set(tokens)
    _check_special_token_texts(tokens)
    return tokens


def _check_special_token_texts(tokens) -> None:
    bad = [token for token in tokens if not isinstance(token, str) or not token]
    if bad:
        raise ValueError(
            f"special tokens must be non-empty strings such as '<|endoftext|>', got {bad!r}: an empty "
            "one would match between every two characters."
        )


_NEVER = float("inf")  # rank of a pair that has no merge
_PIECE_CACHE_LIMIT = 200_000  # pre-tokens whose ids are remembered
_SAVE_FORMAT = "byte-level-bpe/1"


def _learn_merges(piece_counts: collections.Counter, vocab: dict[int, bytes], vocab_size: int, verbose: bool):
    """Learn merges on ``piece_counts`` (pre-token -> count) until ``vocab`` has ``vocab_size`` entries.

    ``vocab`` is extended in place; the merges are returned in the order learned.

    Bookkeeping that keeps every step cheap:
    - each distinct pre-token is stored once, as a list of ids, with its count as a weight;
    - ``pair_counts`` holds the weighted count of every adjacent pair over all pre-tokens,
      and ``pieces_with`` the pre-tokens each pair occurs in;
    - a heap of (-count, left, right) finds the most frequent pair (smallest ids on ties).
      Entries go stale when counts change; a popped entry is used only if its count is current.
    After a merge only the pre-tokens that held the pair are rewritten, and only the counts of
    pairs that appeared or disappeared in them change.
    """
    words = [list(piece.encode("utf-8")) for piece in piece_counts]
    weights = list(piece_counts.values())
    pair_counts: dict[tuple[int, int], int] = collections.defaultdict(int)
    pieces_with: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for index, (word, weight) in enumerate(zip(words, weights, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += weight
            pieces_with[pair].add(index)
    heap = [(-count, *pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(vocab) < vocab_size and heap:
        negative_count, left, right = heapq.heappop(heap)
        pair = (left, right)
        if pair_counts.get(pair, 0) != -negative_count or negative_count == 0:
            continue  # stale entry: this pair's count changed after the entry was pushed
        new_id = len(vocab)
        vocab[new_id] = vocab[left] + vocab[right]
        merges.append(pair)
        if verbose:
            print(
                f"merge {len(merges)}: {vocab[left]!r} + {vocab[right]!r} -> {new_id} ({-negative_count} times)"
            )

        changed = set()
        for index in pieces_with.pop(pair):
            word = words[index]
            merged = _merge_pair(word, pair, new_id)
            if len(merged) == len(word):
                continue  # the pair left this pre-token in an earlier merge
            weight = weights[index]
            delta = collections.Counter()
            for old_pair in pairwise(word):
                delta[old_pair] -= weight
            for new_pair in pairwise(merged):
                delta[new_pair] += weight
                pieces_with[new_pair].add(index)
            for changed_pair, change in delta.items():
                if change:
                    pair_counts[changed_pair] += change
                    changed.add(changed_pair)
            words[index] = merged
        del pair_counts[pair]
        changed.discard(pair)
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], *changed_pair))
    return merges
