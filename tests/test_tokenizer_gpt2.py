"""GPT-2's tokenizer through tiktoken, offline."""

import pytest
import requests
import tiktoken

from shared import data, tokenizer


def test_gpt2_tokenizer_encodes_the_reference_sentence():
    enc = tokenizer.get_gpt2_tokenizer()
    ids = enc.encode("Hello, world. Is this-- a test?")
    assert ids == [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
    assert enc.decode(ids) == "Hello, world. Is this-- a test?"
    assert enc.n_vocab == 50257


def test_local_file_fallback_matches_tiktoken():
    text = data.load_the_verdict()
    assert tokenizer._encoding_from_local_files().encode(text) == tokenizer.get_gpt2_tokenizer().encode(text)


def test_missing_tokenizer_files_give_clear_instructions(monkeypatch, tmp_path):
    def offline(name):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("LLMS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LLMS_OPENAI_BASE_URL", "http://127.0.0.1:9")  # discard port: refused
    tokenizer.get_gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(tokenizer.TokenizerFilesError) as caught:
            tokenizer.get_gpt2_tokenizer()
    finally:
        tokenizer.get_gpt2_tokenizer.cache_clear()
    message = str(caught.value)
    assert "encoder.json" in message and "vocab.bpe" in message
    assert str(tmp_path / "gpt2-tokenizer") in message and "TIKTOKEN_CACHE_DIR" in message
