"""BPETokenizer: training, GPT-2 parity with tiktoken, special tokens, edge cases, save/load."""

import collections
import json
import re
from itertools import pairwise
from pathlib import Path

import pytest
import regex

from shared import data
from shared.bpe import GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode
from shared.tokenizer import get_gpt2_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

EDGE_CASES = [
    "",
    "a",
    "é",
    "ab",
    " ",
    "     ",
    "\n",
    "\n\n\n",
    "  \n\n  \t\n ",
    "   leading spaces",
    "trailing spaces   ",
    "two  spaces, then\n\nnew paragraphs\r\n",
    "It's 2024: we'll see, they've said--'twas 100% right!",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, العربية",
    "emoji 🤗🎉👩‍👩‍👧 and flags 🇳🇿",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def gpt2_bpe():
    return BPETokenizer.from_gpt2_files(
        data.fetch("gpt2-tokenizer/encoder.json"), data.fetch("gpt2-tokenizer/vocab.bpe")
    )


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def verdict():
    return data.load_the_verdict()


@pytest.fixture(scope="module")
def trained(verdict):
    return BPETokenizer().train(verdict, 1000, allowed_special={"<|endoftext|>"})


# ---------------------------------------------------------------------------------------
# GPT-2's files: exactly tiktoken's ids
# ---------------------------------------------------------------------------------------


def test_gpt2_files_encode_the_verdict_exactly_like_tiktoken(gpt2_bpe, tiktoken_gpt2, verdict):
    ids = gpt2_bpe.encode(verdict)
    assert ids == tiktoken_gpt2.encode(verdict)
    assert len(ids) == 5145
    assert gpt2_bpe.decode(ids) == verdict


def test_gpt2_vocabulary_matches_tiktoken(gpt2_bpe, tiktoken_gpt2):
    assert gpt2_bpe.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert gpt2_bpe.special_tokens == {"<|endoftext|>": 50256}
    for token_id in (0, 198, 220, 256, 1000, 31373, 50255):
        assert gpt2_bpe.decode_bytes([token_id]) == tiktoken_gpt2.decode_single_token_bytes(token_id)


def test_unknown_word_is_split_into_subwords(gpt2_bpe):
    assert gpt2_bpe.encode("Akwirw ier") == [33901, 86, 343, 86, 220, 959]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_gpt2_edge_cases_match_tiktoken_and_round_trip(gpt2_bpe, tiktoken_gpt2, text):
    ids = gpt2_bpe.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert gpt2_bpe.decode(ids) == text


def test_random_unicode_text_matches_tiktoken(gpt2_bpe, tiktoken_gpt2):
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies

    # Arbitrary code points (no surrogates, which UTF-8 cannot encode), and text built from
    # the characters where the pre-tokenisation rules meet: spaces, newlines, apostrophes,
    # digits, letters, symbols, combining marks and emoji.
    tricky = strategies.text(
        alphabet=list(" \t\n\r'sdmtlvreA1_.,!?-éß日\u0301\u00a0\u2028🤗<|>"), max_size=40
    )
    any_text = strategies.text(max_size=60)

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(strategies.one_of(any_text, tricky))
    def check(text):
        ids = gpt2_bpe.encode(text, disallowed_special=())
        assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
        assert gpt2_bpe.decode(ids) == text

    check()


# ---------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------


def test_allowed_end_of_text_becomes_its_single_id(gpt2_bpe, tiktoken_gpt2):
    text = "Hello, do you like tea?<|endoftext|> In the sunlit terraces"
    ids = gpt2_bpe.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in ids
    assert ids == tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert gpt2_bpe.encode(text, allowed_special="all") == ids
    assert gpt2_bpe.decode(ids) == text


def test_disallowed_end_of_text_raises_with_a_hint(gpt2_bpe):
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2_bpe.encode("one<|endoftext|>two")


def test_end_of_text_as_plain_text_when_not_special(gpt2_bpe, tiktoken_gpt2):
    text = "one<|endoftext|>two"
    ids = gpt2_bpe.encode(text, disallowed_special=())
    assert 50256 not in ids
    assert ids == tiktoken_gpt2.encode(text, disallowed_special=())


def test_unknown_special_token_is_an_error(gpt2_bpe):
    with pytest.raises(ValueError, match="not special tokens"):
        gpt2_bpe.encode("hi", allowed_special={"<|im_start|>"})


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def _naive_merges(text, vocab_size):
    """Reference trainer: recount every pair over the whole text before each merge."""
    words = [list(piece.encode("utf-8")) for piece in regex.findall(GPT2_SPLIT_PATTERN, text)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = collections.Counter(pair for word in words for pair in pairwise(word))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, smallest ids on ties
        merges.append(best)
        for index, word in enumerate(words):
            merged, i = [], 0
            while i < len(word):
                if word[i : i + 2] == list(best):
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[index] = merged
    return merges


def test_incremental_training_learns_the_same_merges_as_recounting(verdict):
    text = verdict[:3000]
    tokenizer = BPETokenizer().train(text, 400, allowed_special=())
    learned = sorted(tokenizer.merges, key=tokenizer.merges.get)
    assert learned == _naive_merges(text, 400)


def test_training_reaches_the_vocab_size_with_specials_last(trained, verdict):
    assert trained.vocab_size == len(trained) == len(trained.vocab) == 1000
    assert trained.special_tokens == {"<|endoftext|>": 999}
    assert len(trained.merges) == 1000 - 256 - 1
    assert len(trained.encode(verdict)) < len(verdict.encode("utf-8")) / 2


def test_training_is_deterministic(verdict, trained):
    again = BPETokenizer().train(verdict, 1000, allowed_special={"<|endoftext|>"})
    assert again.merges == trained.merges
    assert again.vocab == trained.vocab


def test_first_merge_is_the_most_frequent_pair():
    tokenizer = BPETokenizer().train("aaab aaab aaab xy", 257, allowed_special=())
    # Pieces: "aaab" and " aaab" x2, " xy". ("a", "a") occurs 2 x 3 = 6 times.
    assert tokenizer.merges == {(97, 97): 256}
    assert tokenizer.vocab[256] == b"aa"


def test_ties_go_to_the_pair_with_the_smallest_ids():
    tokenizer = BPETokenizer().train("ab cd", 257, allowed_special=())  # "ab", " c", "cd" each once
    assert tokenizer.merges == {(32, 99): 256}  # (" ", "c") has the smallest ids


def test_no_merge_crosses_a_special_token():
    text = "ab<|endoftext|>ab<|endoftext|>ab"
    tokenizer = BPETokenizer().train(text, 300, allowed_special={"<|endoftext|>"})
    special_id = tokenizer.special_tokens["<|endoftext|>"]
    assert tokenizer.vocab[special_id] == b"<|endoftext|>"
    for token_id, token in tokenizer.vocab.items():
        assert b"<" not in token or token_id in (ord("<"), special_id)
    ids = tokenizer.encode(text, allowed_special="all")
    assert ids.count(tokenizer.special_tokens["<|endoftext|>"]) == 2


def test_end_of_text_is_a_special_token_by_default():
    tokenizer = BPETokenizer().train("one two", 300)
    assert tokenizer.special_tokens == {"<|endoftext|>": tokenizer.vocab_size - 1}
    assert BPETokenizer().train("one two", 300, allowed_special=()).special_tokens == {}


def test_training_stops_when_every_piece_is_one_token():
    tokenizer = BPETokenizer().train("hello hello", 1000, allowed_special=())
    assert tokenizer.vocab_size < 1000
    assert tokenizer.encode("hello hello") == [tokenizer.encode("hello")[0], tokenizer.encode(" hello")[0]]


@pytest.mark.parametrize("text", ["", "a", "ab"])
def test_training_on_tiny_text_does_not_fail(text):
    tokenizer = BPETokenizer().train(text, 300)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_a_single_special_token_string_is_one_token_not_its_characters():
    tokenizer = BPETokenizer().train("a<|endoftext|>b", 300, allowed_special="<|endoftext|>")
    assert tokenizer.special_tokens == {"<|endoftext|>": tokenizer.vocab_size - 1}
    assert tokenizer.encode("a<|endoftext|>", allowed_special="<|endoftext|>")[-1] == tokenizer.vocab_size - 1
    with pytest.raises(ValueError, match="no meaning before training"):
        BPETokenizer().train("text", 300, allowed_special="all")


def test_too_small_vocab_size_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer().train("text", 256, allowed_special={"<|endoftext|>"})


@pytest.mark.parametrize("text", EDGE_CASES)
def test_trained_tokenizer_round_trips_edge_cases(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_decode_of_a_character_split_across_tokens_does_not_crash(trained):
    ids = trained.encode("🤗")  # four bytes the tokenizer never merged: four tokens
    assert len(ids) == 4
    assert trained.decode(ids) == "🤗"
    assert trained.decode(ids[:2]) == "\ufffd"
    assert [trained.decode([token_id]) for token_id in ids] == ["\ufffd"] * 4
    assert trained.decode_bytes(ids[:1]) == "🤗".encode()[:1]


def test_gpt2_decode_of_every_prefix_matches_tiktoken(gpt2_bpe, tiktoken_gpt2):
    ids = gpt2_bpe.encode("naïve 🤗 日本語")  # the emoji and the CJK characters span several tokens
    for end in range(len(ids) + 1):
        assert gpt2_bpe.decode(ids[:end]) == tiktoken_gpt2.decode(ids[:end])
    assert "\ufffd" in gpt2_bpe.decode(ids[: ids.index(12520) + 1])  # first byte-token of 🤗


def test_decode_of_an_unknown_id_names_it(trained):
    with pytest.raises(ValueError, match="12345"):
        trained.decode([12345])


# ---------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------


def test_saved_tokenizer_is_plain_json_and_loads_identically(trained, verdict, tmp_path):
    path = trained.save(tmp_path / "tokenizer.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    assert len(document["merges"]) == len(trained.merges)
    assert document["special_tokens"] == {"<|endoftext|>": 999}
    loaded = BPETokenizer.load(path)
    assert loaded.merges == trained.merges and loaded.vocab == trained.vocab
    assert loaded.encode(verdict) == trained.encode(verdict)


def test_saved_gpt2_tokenizer_reloads_with_the_same_ids(gpt2_bpe, tiktoken_gpt2, tmp_path):
    loaded = BPETokenizer.load(gpt2_bpe.save(tmp_path / "gpt2.json"))
    text = "Saved and loaded: GPT-2's merges, 🤗<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")


def test_loading_a_file_that_is_not_a_tokenizer_is_a_clear_error(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a tokenizer saved by BPETokenizer.save"):
        BPETokenizer.load(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text, doc: text[: len(text) // 2], "not valid JSON"),
        (lambda text, doc: json.dumps([doc]), "expected a JSON object"),
        (lambda text, doc: json.dumps({**doc, "vocab": list(doc["vocab"])}), "'vocab' should be a JSON dict"),
        (lambda text, doc: json.dumps({**doc, "merges": "a b"}), "'merges' should be a JSON list"),
        (
            lambda text, doc: json.dumps({**doc, "vocab": {k: str(v) for k, v in doc["vocab"].items()}}),
            "ids must be integers",
        ),
        (
            lambda text, doc: json.dumps({**doc, "special_tokens": {"<|endoftext|>": "999"}}),
            "ids must be integers",
        ),
        (
            lambda text, doc: json.dumps({**doc, "merges": [*doc["merges"], 7]}),
            "every merge should be a string",
        ),
        (lambda text, doc: json.dumps({**doc, "merges": [*doc["merges"], "zzz"]}), "merge line"),
        (lambda text, doc: json.dumps({**doc, "pattern": "(unclosed"}), "missing \\)"),
    ],
    ids=[
        "truncated",
        "list",
        "vocab-list",
        "merges-string",
        "ids-as-strings",
        "special-id-string",
        "merge-not-string",
        "merge-unknown-token",
        "bad-pattern",
    ],
)
def test_loading_a_damaged_file_names_the_file_and_the_problem(trained, tmp_path, damage, message):
    path = trained.save(tmp_path / "tokenizer.json")
    text = path.read_text(encoding="utf-8")
    path.write_text(damage(text, json.loads(text)), encoding="utf-8")
    with pytest.raises(
        ValueError, match="tokenizer.json is not a tokenizer saved by BPETokenizer.save"
    ) as caught:
        BPETokenizer.load(path)
    assert re.search(message, str(caught.value)), str(caught.value)


@pytest.mark.parametrize("specials", ["", {""}, {"<|endoftext|>", ""}])
def test_training_with_an_empty_special_token_is_refused(specials):
    with pytest.raises(ValueError, match="special tokens must be non-empty strings"):
        BPETokenizer().train("some text to train on", 300, allowed_special=specials)


def test_byte_map_is_printable_and_reversible():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
