"""Downloads that survive flaky networks, and zip archives extracted safely.

- :func:`download` fetches a URL to a file with retries, a timeout, a sha256 check and
  fallback URLs, writing to a temporary name and renaming only a complete, verified file.
- :func:`host_url` builds a URL on one of the course's hosts; each host has a base-URL
  override (``LLMS_GITHUB_BASE_URL``, ``LLMS_UCI_BASE_URL``, ``LLMS_OPENAI_BASE_URL``,
  ``LLMS_HF_BASE_URL``) for learners behind a firewall that blocks it: point the variable at
  a mirror that serves the same paths.
- :func:`safe_extract_zip` refuses members that would land outside the target folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm  # plain text bar: works in terminals and notebooks without ipywidgets

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
    hint: str | None = None,
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
      the file by hand; ``hint`` adds one more way to provide it (for example
      ``"or set LLMS_DATA_DIR to a folder that already holds it"``).
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
    advice = (
        f"If this machine is offline or behind a firewall, download the file elsewhere and save it as\n"
        f"  {dest}\n"
        + (f"(its sha256 must be {sha256}), " if sha256 else "")
        + (f"{hint}, " if hint else "")
        + f"or point one of {overrides} at a mirror. See 'Offline and behind a firewall' in README.md."
    )
    error_type = ChecksumError if any(isinstance(e, ChecksumError) for _, e in failures) else DownloadError
    raise error_type(f"Could not download {dest.name}. Tried:\n{tried}\n{advice}")


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
