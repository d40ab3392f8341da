"""The one data directory, the course's files, and the datasets.

Every file the course downloads lands in one data directory, so it is fetched once for
all chapters. The directory is ``$LLMS_DATA_DIR`` when set, else a folder in the user's
cache (``~/.cache/llms-from-scratch``). Files keep their upstream names, so a folder that
holds copies of them (for example one prepared on another machine) is a complete data
directory: point ``LLMS_DATA_DIR`` at it and nothing is downloaded.

Files are fetched through :mod:`shared.download` (retries, checksums, mirrors).
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from shared.download import download, host_url, safe_extract_zip
from shared.utils import ensure_folder

DATA_DIR_ENV_VAR = "LLMS_DATA_DIR"


def data_dir() -> Path:
    """The folder every download goes to (created on first use)."""
    configured = os.environ.get(DATA_DIR_ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
    else:
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(cache_home) / "llms-from-scratch"
    if configured and path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{DATA_DIR_ENV_VAR}={configured} is a file, not a folder; point it at a folder (it is created "
            "if missing) or unset it to use the cache folder."
        )
    return ensure_folder(path)


# ---------------------------------------------------------------------------------------
# The course's files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    host: str
    path: str
    sha256: str | None = None
    fallback_urls: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return host_url(self.host, self.path)


_BOOK_REPO = "rasbt/LLMs-from-scratch/main"

# Keys are the file names inside the data directory (the same as in the offline-data folder).
REMOTE_FILES = {
    "the-verdict.txt": RemoteFile(
        "github",
        f"{_BOOK_REPO}/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "instruction-data.json": RemoteFile(
        "github",
        f"{_BOOK_REPO}/ch07/01_main-chapter-code/instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    ),
    # No archive hash: mirrors repack it. The extracted table is checked by content instead.
    "sms+spam+collection.zip": RemoteFile(
        "uci",
        "static/public/228/sms+spam+collection.zip",
        fallback_urls=("https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",),
    ),
    "gpt2-tokenizer/encoder.json": RemoteFile(
        "openai",
        "gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "gpt2-tokenizer/vocab.bpe": RemoteFile(
        "openai",
        "gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


def fetch(name: str, **download_kwargs) -> Path:
    """Path of one of the course's files in the data directory, downloading it if missing."""
    remote = REMOTE_FILES[name]
    return download(
        remote.url,
        data_dir() / name,
        remote.sha256,
        remote.fallback_urls,
        hint=f"or set {DATA_DIR_ENV_VAR} to a folder that already holds it",
        **download_kwargs,
    )


class DataValidationError(ValueError):
    """A data file does not have the content it should."""


def load_the_verdict() -> str:
    """Edith Wharton's short story "The Verdict" (public domain), 20,479 characters."""
    return fetch("the-verdict.txt").read_text(encoding="utf-8")


# The SMS Spam Collection as published: 5,574 messages.
SMS_SPAM_COUNTS = {"ham": 4827, "spam": 747}


def load_sms_spam():
    """The UCI SMS Spam Collection as a DataFrame with columns ``Label`` and ``Text``.

    The table is tab-separated with no quoting: some messages begin with a double quote, and
    default CSV quoting would merge those lines with the next (giving 5,572 rows instead of
    5,574). Its content is checked against the published counts.
    """
    import pandas as pd

    table = data_dir() / "sms_spam_collection" / "SMSSpamCollection"
    if not table.exists():
        _extract_sms_spam(table)
    frame = pd.read_csv(
        table,
        sep="\t",
        header=None,
        names=["Label", "Text"],
        quoting=csv.QUOTE_NONE,
        dtype=str,
        keep_default_na=False,
    )
    counts = frame["Label"].value_counts().to_dict()
    if counts != SMS_SPAM_COUNTS:
        raise DataValidationError(
            f"{table} does not look like the SMS Spam Collection: label counts {counts}, "
            f"expected {SMS_SPAM_COUNTS}. Delete {table.parent} and the zip in {data_dir()} to fetch it again."
        )
    return frame


def _extract_sms_spam(table: Path) -> None:
    """Extract the SMS Spam Collection's table from its zip, fetching the zip again once if it is
    damaged (truncated, or a captive portal's HTML page saved under its name)."""
    name = "sms+spam+collection.zip"
    for attempt in (1, 2):
        archive = fetch(name)
        try:
            safe_extract_zip(archive, table.parent)
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:
            archive.unlink(missing_ok=True)  # never leave a bad file that fails on every call
            if attempt == 2:
                remote = REMOTE_FILES[name]
                raise DataValidationError(
                    f"{archive} is not a valid zip archive ({error}), even after downloading it again "
                    f"(was the download intercepted by a login page or proxy?). Download it by hand from "
                    f"{remote.url} (or {', '.join(remote.fallback_urls) or 'a mirror'}) and save it as "
                    f"{archive}."
                ) from error
            continue
        if not table.exists():
            raise DataValidationError(
                f"{archive} does not contain {table.name}; replace it with the SMS Spam Collection zip "
                f"from {REMOTE_FILES[name].url}."
            )
        return


INSTRUCTION_KEYS = ("instruction", "input", "output")


def validate_instruction_entries(entries, source: str = "instruction data") -> list[dict]:
    """Check that ``entries`` is a list of dicts with string instruction/input/output fields.

    Raises :class:`DataValidationError` naming the first bad entry's index and key.
    """
    if not isinstance(entries, list):
        raise DataValidationError(f"{source}: expected a JSON list of entries, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataValidationError(
                f"{source}: entry {index} is a {type(entry).__name__}, expected an object"
            )
        for key in INSTRUCTION_KEYS:
            if key not in entry:
                raise DataValidationError(f"{source}: entry {index} has no key {key!r}")
            if not isinstance(entry[key], str):
                raise DataValidationError(
                    f"{source}: entry {index}, key {key!r} must be a string, got {type(entry[key]).__name__}"
                )
    return entries


def load_instruction_data(path: str | os.PathLike | None = None) -> list[dict]:
    """The 1,100 Alpaca-style entries used in ch07 (or the JSON file at ``path``), validated."""
    path = Path(path) if path is not None else fetch("instruction-data.json")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataValidationError(f"{path} is not valid JSON: {error}") from error
    return validate_instruction_entries(entries, source=str(path))
