"""Tokenizers: GPT-2's byte-pair encoding through tiktoken (more arrive with ch02)."""

from __future__ import annotations

import functools
import os

from shared import data


class TokenizerFilesError(RuntimeError):
    """The GPT-2 tokenizer files could not be found or fetched."""


def _encoding_from_local_files():
    """Build tiktoken's GPT-2 encoding from encoder.json and vocab.bpe in the data directory.

    This path goes through :func:`shared.data.fetch`, so it honours ``LLMS_OPENAI_BASE_URL``
    (a mirror) and a data directory prepared by hand.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data.fetch("gpt2-tokenizer/vocab.bpe")),
        encoder_json_file=str(data.fetch("gpt2-tokenizer/encoder.json")),
    )
    # The same specification tiktoken registers for "gpt2", with the ranks read locally.
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


@functools.lru_cache(maxsize=1)
def get_gpt2_tokenizer():
    """GPT-2's tokenizer, ``tiktoken.get_encoding("gpt2")``, usable offline.

    tiktoken keeps its files in ``$TIKTOKEN_CACHE_DIR``; when that is unset we point it at
    ``<data dir>/tiktoken-cache`` so all downloads share one folder. If tiktoken cannot fetch
    its files (offline, firewall), the encoding is built from ``encoder.json`` and
    ``vocab.bpe`` in ``<data dir>/gpt2-tokenizer/`` (fetched through the mirror-aware
    downloader). If that fails too, :class:`TokenizerFilesError` says how to provide them.
    """
    import tiktoken

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data.data_dir() / "tiktoken-cache"))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as tiktoken_error:  # requests errors, hash mismatches, missing files
        try:
            return _encoding_from_local_files()
        except data.DownloadError as download_error:
            raise TokenizerFilesError(
                "Could not load the GPT-2 tokenizer.\n"
                f"tiktoken failed with: {tiktoken_error}\n"
                f"The fallback failed with: {download_error}\n"
                "To work offline, copy encoder.json and vocab.bpe (from "
                "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/) into "
                f"{data.data_dir() / 'gpt2-tokenizer'}, or set TIKTOKEN_CACHE_DIR to a folder "
                "holding tiktoken's cached copies of them."
            ) from download_error
