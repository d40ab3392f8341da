"""Downloads, the one data directory, and the course's datasets.

Every file the course downloads lands in one data directory, so it is fetched once for
all chapters. The directory is ``$LLMS_DATA_DIR`` when set, else a folder in the user's
cache (``~/.cache/llms-from-scratch``). Files keep their upstream names, so a folder that
holds copies of them (for example one prepared on another machine) is a complete data
directory: point ``LLMS_DATA_DIR`` at it and nothing is downloaded.

Each host has a base-URL override (``LLMS_GITHUB_BASE_URL``, ``LLMS_UCI_BASE_URL``,
``LLMS_OPENAI_BASE_URL``, ``LLMS_HF_BASE_URL``) for learners behind a firewall that blocks
it: point the variable at a mirror that serves the same paths.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm  # plain text bar: works in terminals and notebooks without ipywidgets

DATA_DIR_ENV_VAR = "LLMS_DATA_DIR"


def data_dir() -> Path:
    """The folder every download goes to (created on first use)."""
    configured = os.environ.get(DATA_DIR_ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
    else:
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(cache_home) / "llms-from-scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------
# Hosts and their mirrors
# ---------------------------------------------------------------------------------------

# host name -> (environment variable that overrides it, default base URL)
HOSTS = {
    "github": ("LLMS_GITHUB_BASE_URL", "https://raw.githubusercontent.com"),
    "uci": ("LLMS_UCI_BASE_URL", "https://archive.ics.uci.edu"),
    "openai": ("LLMS_OPENAI_BASE_URL", "https://openaipublic.blob.core.windows.net"),
    "huggingface": ("LLMS_HF_BASE_URL", "https://huggingface.co"),
}


def host_url(host: str, path: str) -> str:
    """The URL of ``path`` on ``host``, honouring the host's base-URL override.

    For Hugging Face, the hub's own ``HF_ENDPOINT`` variable is honoured too.
    """
    env_var, default = HOSTS[host]
    base = os.environ.get(env_var)
    if not base and host == "huggingface":
        base = os.environ.get("HF_ENDPOINT")
    return (base or default).rstrip("/") + "/" + path.lstrip("/")


# ---------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """No source could deliver a file."""


class ChecksumError(DownloadError):
    """A file arrived, but its sha256 was not the expected one."""


class _TruncatedDownload(OSError):
    """The connection closed before Content-Length bytes arrived (worth a retry)."""


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_permanent(error: Exception) -> bool:
    """Client errors (404, 403, ...) will not go away by asking again; 408/429/5xx might."""
    return (
        isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 and error.code not in (408, 429)
    )


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    return f"{type(error).__name__}: {error}"


def _fetch_once(url: str, dest: Path, sha256: str | None, timeout: float, progress: bool) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; rename only when complete and verified."""
    request = urllib.request.Request(url, headers={"User-Agent": "llm-course/0.1"})
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            expected_size = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(
                total=expected_size,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
                leave=False,
            ) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
        if expected_size is not None and received != expected_size:
            raise _TruncatedDownload(f"connection closed after {received} of {expected_size} bytes")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(f"sha256 mismatch: expected {sha256}, got {actual}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    fallback_urls=(),
    *,
    timeout: float = 30.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest`` as a Path.

    - A file already at ``dest`` is kept when its sha256 matches (or no hash is given).
    - Each source is tried up to ``retries`` times on transient errors (timeouts, resets,
      truncated transfers, 5xx); a 4xx or a checksum mismatch moves on to the next URL in
      ``fallback_urls`` at once.
    - Data goes to a temporary file in the same folder and is renamed onto ``dest`` only after
      it is complete and its sha256 matches, so no partial file is ever left behind.
    - When every source fails, raises :class:`DownloadError` (or :class:`ChecksumError` when a
      source delivered wrong bytes) naming the file, each URL with its reason, and how to place
      the file by hand.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    failures: list[tuple[str, Exception]] = []
    for source in (url, *fallback_urls):
        for attempt in range(1, max(1, retries) + 1):
            try:
                _fetch_once(source, dest, sha256, timeout, progress)
                return dest
            except (ChecksumError, OSError, http.client.HTTPException, ValueError) as error:
                # OSError covers URLError, HTTPError, timeouts and resets; ValueError a malformed URL.
                last_try = attempt == retries or isinstance(error, (ChecksumError, ValueError))
                if last_try or _is_permanent(error):
                    failures.append((source, error))
                    break
                time.sleep(0.5 * 2 ** (attempt - 1))

    tried = "\n".join(f"  - {source}: {_describe(error)}" for source, error in failures)
    overrides = ", ".join(env_var for env_var, _ in HOSTS.values())
    hint = (
        f"If this machine is offline or behind a firewall, download the file elsewhere and save it as\n"
        f"  {dest}\n"
        + (f"(its sha256 must be {sha256}), " if sha256 else "")
        + f"or set {DATA_DIR_ENV_VAR} to a folder that already holds it, "
        f"or point one of {overrides} at a mirror. See 'Offline and behind a firewall' in README.md."
    )
    error_type = ChecksumError if any(isinstance(e, ChecksumError) for _, e in failures) else DownloadError
    raise error_type(f"Could not download {dest.name}. Tried:\n{tried}\n{hint}")


# ---------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the folder it is extracted to."""


def _check_member_name(name: str) -> None:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        raise UnsafeArchiveError(f"refusing archive member with an absolute path: {name!r}")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeArchiveError(f"refusing archive member with a '..' component: {name!r}")


def safe_extract_zip(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Extract a zip archive into ``dest_dir`` and return the extracted file paths.

    Every member name is checked before anything is written: absolute paths, drive letters
    and ``..`` components are refused (:class:`UnsafeArchiveError`). Each file is written to a
    temporary name and renamed, so an interrupted extraction leaves no half-written file.
    """
    dest_dir = Path(dest_dir)
    extracted = []
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            _check_member_name(member.filename)
        for member in members:
            if member.is_dir():
                continue
            target = dest_dir / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    shutil.copyfileobj(src, out)
                os.replace(tmp_name, target)
            finally:
                Path(tmp_name).unlink(missing_ok=True)
            extracted.append(target)
    return extracted


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
    return download(remote.url, data_dir() / name, remote.sha256, remote.fallback_urls, **download_kwargs)


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
        safe_extract_zip(fetch("sms+spam+collection.zip"), table.parent)
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
