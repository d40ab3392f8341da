"""shared.corpus: tokenising a corpus once into a memory-mapped file, and sampling windows from it."""

import functools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.corpus import (
    CorpusError,
    PreparedCorpus,
    WindowSampler,
    choose_prepared_dir,
    encode_file,
    fixed_windows,
    prepare_corpus,
    prepare_for_training,
)
from shared.tokenizer import get_gpt2_tokenizer


@functools.cache
def tokenizer():
    return get_gpt2_tokenizer()

EOT = "<|endoftext|>"
DOCUMENTS = [
    "Every effort moves you forward.\n\nI HAD always thought Jack Gisburn rather a cheap genius.",
    "Second  document:\twith tabs,   runs of spaces\r\nand Windows line ends... 12345 numbers!\n\n\n",
    "Unicode too: caf\u00e9, na\u00efve, \u4e2d\u6587, emoji \U0001f600 and it's, we'll, they've. " * 20,
]


def write_corpus(folder, documents):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(documents):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8", newline="")
    return folder


def whole_text_ids(documents):
    return tokenizer().encode(EOT.join(documents), allowed_special={EOT})


@pytest.mark.parametrize("block_bytes", [16, 100, 1 << 20])
def test_folder_gives_the_ids_of_the_concatenation_with_end_of_text_separators(tmp_path, block_bytes):
    corpus = prepare_corpus(
        write_corpus(tmp_path / "books", DOCUMENTS), tmp_path / "prepared", block_bytes=block_bytes, progress=False
    )
    assert corpus.tokens().tolist() == whole_text_ids(DOCUMENTS)
    assert corpus.tokens().dtype == np.uint16
    assert corpus.meta["tokenizer"]["name"] == "gpt2"
    assert [s["name"] for s in corpus.meta["sources"]] == ["doc00.txt", "doc01.txt", "doc02.txt"]


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Z9.,'\n\r\t \u00e9")), max_size=300), st.integers(4, 64))
def test_cutting_a_file_into_blocks_never_changes_its_tokens(tmp_path_factory, text, block_bytes):
    path = tmp_path_factory.mktemp("blocks") / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    ids = [int(i) for block in encode_file(path, tokenizer(), block_bytes) for i in block]
    assert ids == tokenizer().encode_ordinary(text)


def test_unchanged_corpus_is_reused_and_a_changed_file_triggers_preparation(tmp_path):
    books = write_corpus(tmp_path / "books", DOCUMENTS)
    first = prepare_corpus(books, tmp_path / "prepared", progress=False)
    assert first.reused is False
    again = prepare_corpus(books, tmp_path / "prepared", progress=False)
    assert again.reused is True and again.fingerprint == first.fingerprint

    (books / "doc01.txt").write_text("A different second document.", encoding="utf-8")
    changed = prepare_corpus(books, tmp_path / "prepared", progress=False)
    assert changed.reused is False and changed.fingerprint != first.fingerprint
    assert changed.tokens().tolist() == whole_text_ids([DOCUMENTS[0], "A different second document.", DOCUMENTS[2]])

    (books / "doc03.txt").write_text("An added document.", encoding="utf-8")
    assert prepare_corpus(books, tmp_path / "prepared", progress=False).reused is False
    # A different held-out share changes the split, so it also prepares again.
    assert prepare_corpus(books, tmp_path / "prepared", val_fraction=0.3, progress=False).reused is False


def test_half_written_preparation_is_not_taken_for_a_finished_one(tmp_path):
    books = write_corpus(tmp_path / "books", DOCUMENTS)
    corpus = prepare_corpus(books, tmp_path / "prepared", progress=False)
    with open(corpus.tokens_path, "r+b") as file:  # as if a crash had cut the file short
        file.truncate(10)
    with pytest.raises(CorpusError, match="promises"):
        PreparedCorpus.open(tmp_path / "prepared")
    assert prepare_corpus(books, tmp_path / "prepared", progress=False).reused is False


def test_validation_split_is_the_last_documents_or_the_last_tokens_of_one(tmp_path):
    documents = [f"Document number {i}. " * 50 for i in range(10)]
    corpus = prepare_corpus(write_corpus(tmp_path / "many", documents), tmp_path / "p1", progress=False)
    ids = corpus.tokens()
    start, end = corpus.val
    assert end == corpus.num_tokens and corpus.train == (0, start)
    # The split falls on a document boundary, right after an <|endoftext|>, and holds about 10%.
    assert ids[start - 1] == tokenizer().eot_token
    assert tokenizer().decode(ids[start:end].tolist()).startswith("Document number 9.")
    assert 0.05 < (end - start) / corpus.num_tokens < 0.2

    single = prepare_corpus(write_corpus(tmp_path / "one", documents[:1]), tmp_path / "p2", progress=False)
    start, end = single.val
    assert end - start == int(np.ceil(0.1 * single.num_tokens))


def test_empty_and_binary_files_are_skipped_with_a_warning(tmp_path):
    books = write_corpus(tmp_path / "books", DOCUMENTS[:1])
    (books / "empty.txt").write_text("")
    (books / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (books / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.warns(UserWarning) as caught:
        corpus = prepare_corpus(books, tmp_path / "prepared", progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "empty.txt: empty" in messages and "NUL bytes" in messages and "not UTF-8" in messages
    assert corpus.tokens().tolist() == whole_text_ids(DOCUMENTS[:1])
    assert {s["name"] for s in corpus.meta["skipped"]} == {"empty.txt", "image.txt", "latin1.txt"}


def test_a_corpus_with_nothing_usable_is_refused_and_nothing_is_written(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "empty.txt").write_text("")
    with pytest.warns(UserWarning), pytest.raises(CorpusError, match="no usable text.*empty.txt: empty"):
        prepare_corpus(books, tmp_path / "prepared", progress=False)
    assert not (tmp_path / "prepared").exists()
    with pytest.raises(CorpusError, match="holds no .txt files"):
        prepare_corpus(_empty_dir(tmp_path), progress=False)


def _empty_dir(tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    return folder


def test_corpus_smaller_than_one_window_is_refused_with_the_numbers(tmp_path):
    corpus = prepare_corpus(write_corpus(tmp_path / "tiny", ["Just a few words here."]), tmp_path / "p", progress=False)
    with pytest.raises(CorpusError, match=r"one window needs 33 tokens, but the training split has \d+"):
        WindowSampler(corpus, "train", context_length=32, batch_size=2, seed=1)


def test_sampler_windows_depend_only_on_seed_step_micro_batch_and_rank(tmp_path):
    corpus = prepare_corpus(write_corpus(tmp_path / "books", DOCUMENTS), tmp_path / "p", progress=False)
    sampler = WindowSampler(corpus, "train", context_length=8, batch_size=4, seed=7)
    inputs, targets = sampler.batch(step=5, micro=1)
    again, _ = WindowSampler(corpus, "train", context_length=8, batch_size=4, seed=7).batch(step=5, micro=1)
    assert inputs.shape == targets.shape == (4, 8) and inputs.dtype.is_floating_point is False
    assert inputs.equal(again)
    assert not np.array_equal(sampler.starts(5, 1), sampler.starts(6, 1))
    assert not np.array_equal(sampler.starts(5, 1), sampler.starts(5, 0))
    rank1 = WindowSampler(corpus, "train", context_length=8, batch_size=4, seed=7, rank=1)
    assert not np.array_equal(sampler.starts(5, 1), rank1.starts(5, 1))
    # Targets are the inputs shifted by one, read from the file; windows stay inside the split.
    ids = corpus.tokens()
    for row, start in enumerate(sampler.starts(5, 1)):
        assert inputs[row].tolist() == ids[start : start + 8].tolist()
        assert targets[row].tolist() == ids[start + 1 : start + 9].tolist()
    starts = np.concatenate([sampler.starts(step) for step in range(200)])
    assert starts.min() >= 0 and starts.max() + 9 <= corpus.train[1]


def test_evaluation_windows_are_fixed_and_inside_the_span():
    starts = fixed_windows((100, 200), context_length=10, count=5)
    assert starts.tolist() == [100, 122, 144, 167, 189]
    with pytest.raises(CorpusError, match="holds no window of 11 tokens"):
        fixed_windows((0, 5), context_length=10, count=2)


def test_prepared_dir_is_the_chosen_one_else_beside_the_data_else_in_the_data_folder(tmp_path, monkeypatch):
    data = tmp_path / "books"
    data.mkdir()
    assert choose_prepared_dir(data, tmp_path / "mine") == tmp_path / "mine"
    assert choose_prepared_dir(data) == tmp_path / "books.tokens"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # the data's folder is read-only
    fallback = choose_prepared_dir(data)
    assert fallback.parent.name == "prepared-corpora" and fallback.name.startswith("books.tokens-")


def test_prepare_for_training_in_one_process_prepares_then_reuses(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Every effort moves you forward. " * 200)
    first = prepare_for_training(tmp_path / "a.txt", tmp_path / "prepared", progress=False)
    again = prepare_for_training(tmp_path / "a.txt", tmp_path / "prepared", progress=False)
    assert first.reused is False and again.reused is True and again.num_tokens == first.num_tokens
    assert "(reused)" in capsys.readouterr().out


class _SilentlyShortWrite(np.ndarray):
    """An id array whose ``tofile`` writes only half, without an error: numpy on a full disk."""

    def tofile(self, file, *args, **kwargs):
        np.asarray(self)[: len(self) // 2].tofile(file)


def test_a_full_disk_while_preparing_leaves_no_truncated_tokens_file(tmp_path, monkeypatch):
    import shared.corpus

    books = write_corpus(tmp_path / "books", DOCUMENTS)
    real_encode = shared.corpus.encode_file

    def encode_short(*args, **kwargs):
        for ids in real_encode(*args, **kwargs):
            yield ids.view(_SilentlyShortWrite)

    monkeypatch.setattr(shared.corpus, "encode_file", encode_short)
    with pytest.raises(CorpusError, match=r"the disk holding .*prepared is full: tokens.bin was not written"):
        prepare_corpus(books, tmp_path / "prepared", progress=False)
    assert list((tmp_path / "prepared").iterdir()) == []  # no tokens.bin, no half-written .part file
