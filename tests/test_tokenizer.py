"""shared.tokenizer: the chapter's word-level tokenizers (splitting, vocabulary, SimpleTokenizerV1
and V2), and GPT-2's tokenizer through tiktoken: offline, through a mirror, and never hanging."""

import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from shared import data, tokenizer
from shared.tokenizer import (
    END_OF_TEXT,
    UNKNOWN,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    simple_split,
)

SENTENCES = [
    "It's the last he painted, you know,",
    '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.',
    "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no great surprise to me.",
    "(Though I rather thought it would have been Rome or Florence.)",
    'Mrs. Gisburn said: "I _was_ painting; and I didn\'t know!"',
]


@pytest.fixture(scope="module")
def verdict():
    return data.load_the_verdict()


@pytest.fixture(scope="module")
def vocab(verdict):
    return build_vocab(verdict)


def test_split_separates_punctuation_and_double_dashes():
    assert simple_split("Hello, world. Is this-- a test?") == [
        "Hello",
        ",",
        "world",
        ".",
        "Is",
        "this",
        "--",
        "a",
        "test",
        "?",
    ]


def test_the_verdict_has_4690_tokens_and_1130_distinct(verdict, vocab):
    assert len(verdict) == 20479
    assert len(simple_split(verdict)) == 4690
    assert len(vocab) == 1130
    assert list(vocab.values()) == list(range(1130))


def test_special_tokens_come_last(verdict):
    vocab = build_vocab(verdict, special_tokens=[END_OF_TEXT, UNKNOWN])
    assert len(vocab) == 1132
    assert vocab[END_OF_TEXT] == 1130 and vocab[UNKNOWN] == 1131


@pytest.mark.parametrize("sentence", SENTENCES)
def test_v1_round_trips_sentences_including_spacing_around_punctuation(vocab, sentence):
    tokenizer = SimpleTokenizerV1(vocab)
    assert tokenizer.decode(tokenizer.encode(sentence)) == sentence


def test_v1_ids_round_trip_on_the_whole_story(vocab, verdict):
    tokenizer = SimpleTokenizerV1(vocab)
    ids = tokenizer.encode(verdict)
    assert len(ids) == 4690
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_v1_decode_drops_only_whitespace(vocab, verdict):
    tokenizer = SimpleTokenizerV1(vocab)
    decoded = tokenizer.decode(tokenizer.encode(verdict))
    assert decoded.replace(" ", "") == "".join(verdict.split())


def test_v1_error_names_the_unknown_word(vocab):
    with pytest.raises(KeyError, match="'Hello' is not in the vocabulary"):
        SimpleTokenizerV1(vocab).encode("Hello, do you like tea?")


def test_v2_maps_unknown_words_to_unk(verdict):
    vocab = build_vocab(verdict, special_tokens=[END_OF_TEXT, UNKNOWN])
    tokenizer = SimpleTokenizerV2(vocab)
    text = SimpleTokenizerV2.join_documents(
        ["Hello, do you like tea?", "In the sunlit terraces of the palace."]
    )
    assert text == "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tokenizer.encode(text)
    assert ids.count(vocab[UNKNOWN]) == 2  # Hello and palace; the story does have tea
    assert ids.count(vocab[END_OF_TEXT]) == 1
    assert (
        tokenizer.decode(ids)
        == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    )


@pytest.mark.parametrize("sentence", SENTENCES)
def test_v2_round_trips_known_text_like_v1(verdict, sentence):
    vocab = build_vocab(verdict, special_tokens=[END_OF_TEXT, UNKNOWN])
    tokenizer = SimpleTokenizerV2(vocab)
    assert tokenizer.encode(sentence) == SimpleTokenizerV1(vocab).encode(sentence)
    assert tokenizer.decode(tokenizer.encode(sentence)) == sentence


def test_v2_without_special_tokens_in_the_vocabulary_says_how_to_build_one(vocab):
    with pytest.raises(ValueError, match="build_vocab"):
        SimpleTokenizerV2(vocab)


def test_decode_of_an_unknown_id_is_a_clear_error(vocab):
    with pytest.raises(ValueError, match="token id 5000 is not in the vocabulary"):
        SimpleTokenizerV1(vocab).decode([5000])


# ---------------------------------------------------------------------------------------
# GPT-2's tokenizer through tiktoken
# ---------------------------------------------------------------------------------------

OFFLINE_FILES = ("gpt2-tokenizer/encoder.json", "gpt2-tokenizer/vocab.bpe")


@pytest.fixture
def fresh_tokenizer(monkeypatch, tmp_path):
    """An empty data directory and tiktoken cache, and no encoding remembered from earlier tests.

    tiktoken's own downloader is replaced by one that fails the test: every file must come
    through shared.data, with its time limit.
    """

    read_local_file = tiktoken.load.read_file

    def no_download(blobpath):
        if "://" in blobpath:
            raise AssertionError(f"tiktoken tried to download {blobpath} itself")
        return read_local_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    tokenizer.get_gpt2_tokenizer.cache_clear()
    yield tmp_path
    tokenizer.get_gpt2_tokenizer.cache_clear()


@pytest.fixture
def gpt2_mirror(tmp_path, serve_folder):
    """A local mirror of OpenAI's host holding GPT-2's two tokenizer files."""
    folder = tmp_path / "mirror" / "gpt-2" / "encodings" / "main"
    folder.mkdir(parents=True)
    for name in OFFLINE_FILES:
        shutil.copyfile(data.fetch(name), folder / Path(name).name)
    return serve_folder(tmp_path / "mirror")


def test_gpt2_tokenizer_encodes_the_reference_sentence():
    enc = tokenizer.get_gpt2_tokenizer()
    ids = enc.encode("Hello, world. Is this-- a test?")
    assert ids == [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
    assert enc.decode(ids) == "Hello, world. Is this-- a test?"
    assert enc.n_vocab == 50257


def test_files_from_a_mirror_fill_tiktokens_cache_and_tiktoken_downloads_nothing(
    gpt2_mirror, fresh_tokenizer, monkeypatch
):
    monkeypatch.setenv("LLMS_OPENAI_BASE_URL", gpt2_mirror)
    enc = tokenizer.get_gpt2_tokenizer()
    assert enc.encode("Hello, world.") == [15496, 11, 995, 13]
    cached = sorted(p.name for p in (fresh_tokenizer / "tiktoken-cache").iterdir())
    assert cached == ["6c7ea1a7e38e3a7f062df639a5b80947f075ffe6", "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"]


@pytest.fixture(scope="module")
def verdict_and_ids(verdict):
    """The Verdict's ids from tiktoken's own GPT-2 encoding (before any test empties the data directory)."""
    return verdict, tokenizer.get_gpt2_tokenizer().encode(verdict)


def test_without_tiktokens_cache_the_encoding_is_built_from_the_data_directory(
    verdict_and_ids, gpt2_mirror, fresh_tokenizer, monkeypatch
):
    verdict, expected_ids = verdict_and_ids
    monkeypatch.setenv("LLMS_OPENAI_BASE_URL", gpt2_mirror)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's switch for "no cache"
    enc = tokenizer.get_gpt2_tokenizer()
    assert enc.encode(verdict) == expected_ids and len(expected_ids) == 5145
    assert (fresh_tokenizer / "data" / "gpt2-tokenizer" / "vocab.bpe").is_file()


def test_server_that_never_answers_gives_up_in_bounded_time_and_explains(
    silent_server_url, fresh_tokenizer, monkeypatch
):
    monkeypatch.setenv("LLMS_OPENAI_BASE_URL", silent_server_url)
    monkeypatch.setattr(tokenizer, "GPT2_FILES_TIMEOUT", 0.3)
    with pytest.raises(tokenizer.TokenizerFilesError) as caught:
        tokenizer.get_gpt2_tokenizer()
    message = str(caught.value)
    assert "timed out" in message
    assert "encoder.json" in message and "vocab.bpe" in message
    assert str(fresh_tokenizer / "data" / "gpt2-tokenizer") in message and "TIKTOKEN_CACHE_DIR" in message


def test_refused_connection_gives_clear_instructions(closed_port_url, fresh_tokenizer, monkeypatch):
    monkeypatch.setenv("LLMS_OPENAI_BASE_URL", closed_port_url)
    with pytest.raises(tokenizer.TokenizerFilesError, match="Could not load the GPT-2 tokenizer"):
        tokenizer.get_gpt2_tokenizer()
