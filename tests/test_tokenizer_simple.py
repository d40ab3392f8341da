"""The chapter's word-level tokenizers: splitting, vocabulary, SimpleTokenizerV1 and V2."""

import pytest

from shared import data
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
