"""Downloads that survive flaky networks, and zip archives extracted safely.

- :func:`download` fetches a URL to a file with retries, a timeout, a sha256 check and
  fallback URLs, writing to a temporary name and renaming only a complete, verified file.
- :func:`host_url` builds a URL on one of the course's hosts; each host has a base-URL
  override (``LLMS_GITHUB_BASE_URL``, ``LLMS_UCI_BASE_URL``, ``LLMS_OPENAI_BASE_URL``,
  ``LLMS_HF_BASE_URL``) for learners behind a firewall that blocks it: point the variable at
  a mirror that serves the same paths.
- :func:`safe_extract_zip` refuses members that would land outside the target folder, or
  that are a file in one place and a folder in another, before writing anything.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from shared.utils import atomic_path, temp_path_beside

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


class DestinationError(DownloadError):
    """The file cannot be written where it was asked for (a folder, read-only, disk full)."""


def _cannot_write(dest: Path, error: OSError) -> DestinationError:
    return DestinationError(
        f"Cannot write {dest}: {error.strerror or error}. This is a problem with the destination, not "
        f"the network: make sure {dest.parent} is a folder you can write to and that its disk has "
        "space, or download to another folder."
    )


def _format_size(num_bytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes} B"


class _Progress:
    """One line on stderr: updated in place while a file arrives, then ``name: size in time``.

    The line is rewritten with a carriage return, which terminals and JupyterLab both honour,
    so a finished download leaves exactly one short line (no bar that clears itself into an
    empty strip).
    """

    def __init__(self, name: str, total: int | None, enabled: bool):
        self.name, self.total = name, total
        self.enabled = enabled and sys.stderr is not None  # pythonw and some services have no stderr
        self.received = 0
        self.started = self.last_shown = time.monotonic()
        self.width = 0

    def __enter__(self) -> _Progress:
        return self

    def update(self, num_bytes: int) -> None:
        self.received += num_bytes
        now = time.monotonic()
        if self.enabled and now - self.last_shown >= 0.5:
            self.last_shown = now
            share = f" of {_format_size(self.total)} ({self.received / self.total:.0%})" if self.total else ""
            self._show(f"{self.name}: {_format_size(self.received)}{share}")

    def _show(self, text: str) -> None:
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = max(self.width, len(text))

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None and self.enabled:
            seconds = time.monotonic() - self.started
            self._show(f"{self.name}: {_format_size(self.received)} in {seconds:.1f} s")
        if self.width:  # end the line, so that what comes next starts on its own
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fetch_once(url: str, dest: Path, sha256: str | None, timeout: float, progress: bool) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; rename only when complete and verified."""
    request = urllib.request.Request(url, headers={"User-Agent": "llm-course/0.1"})
    try:
        tmp = temp_path_beside(dest)
    except OSError as error:
        raise _cannot_write(dest, error) from error
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            expected_size = int(response.headers.get("Content-Length") or 0) or None
            with _Progress(dest.name, expected_size, progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    try:
                        out.write(block)
                    except OSError as error:  # disk full, quota: asking the server again will not help
                        raise _cannot_write(dest, error) from error
                    digest.update(block)
                    bar.update(len(block))
                if expected_size is not None and bar.received != expected_size:
                    raise _TruncatedDownload(
                        f"connection closed after {bar.received} of {expected_size} bytes"
                    )
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
      ``fallback_urls`` at once. ``timeout`` bounds each wait for the server (connecting, or
      the next block of data), so a server that accepts the connection but never answers
      fails after ``timeout`` seconds per attempt.
    - Data goes to a temporary file in the same folder and is renamed onto ``dest`` only after
      it is complete and its sha256 matches, so no partial file is ever left behind. The file
      gets the permissions the umask gives any new file.
    - ``progress`` shows one line on stderr while the file arrives; what is left is one line
      with the file's name, size and download time.
    - A ``dest`` that is a folder, or that cannot be written, raises :class:`DestinationError`
      at once (no retries).
    - When every source fails, raises :class:`DownloadError` (or :class:`ChecksumError` when a
      source delivered wrong bytes) naming the file, each URL with its reason, and how to place
      the file by hand; ``hint`` adds one more way to provide it (for example
      ``"or set LLMS_DATA_DIR to a folder that already holds it"``).
    """
    dest = Path(dest)
    if dest.is_dir():
        raise DestinationError(
            f"{dest} is a folder; download() needs the path of the file to write, e.g. {dest / Path(url).name}"
        )
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256.lower()):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_write(dest, error) from error

    failures: list[tuple[str, Exception]] = []
    for source in (url, *fallback_urls):
        for attempt in range(1, max(1, retries) + 1):
            try:
                _fetch_once(source, dest, sha256, timeout, progress)
                return dest
            except (ChecksumError, OSError, http.client.HTTPException, ValueError) as error:
                # OSError covers URLError, HTTPError, timeouts and resets; ValueError a malformed URL.
                last_try = attempt >= retries or isinstance(error, (ChecksumError, ValueError))
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
        + f"or point one of {overrides} at a mirror. See 'Data, offline use and firewalls' in README.md."
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


def _check_layout(members: list[zipfile.ZipInfo], dest_dir: Path) -> None:
    """Refuse a name that is a file in one place and a folder in another (in the archive, or
    between the archive and what ``dest_dir`` already holds): extraction would fail halfway."""
    files: dict[tuple[str, ...], str] = {}
    folders: set[tuple[str, ...]] = set()
    for member in members:
        parts = PurePosixPath(member.filename).parts
        folders.update(parts[:end] for end in range(1, len(parts)))
        if member.is_dir():
            folders.add(parts)
        elif parts:
            files[parts] = member.filename
    for parts, name in files.items():
        if parts in folders:
            raise UnsafeArchiveError(
                f"refusing archive member {name!r}: the archive also has a folder of that name"
            )
        if dest_dir.joinpath(*parts).is_dir():
            raise UnsafeArchiveError(
                f"refusing archive member {name!r}: {dest_dir.joinpath(*parts)} is a folder already"
            )
    for parts in folders:
        existing = dest_dir.joinpath(*parts)
        if existing.exists() and not existing.is_dir():
            raise UnsafeArchiveError(
                f"refusing archive: it needs a folder at {existing}, where a file of that name is already"
            )


def safe_extract_zip(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Extract a zip archive into ``dest_dir`` and return the extracted file paths.

    Every member name is checked before anything is written: absolute paths, drive letters,
    ``..`` components, and a name that is a file in one place and a folder in another are
    refused (:class:`UnsafeArchiveError`). Each file is written to a temporary name and
    renamed, so an interrupted extraction leaves no half-written file; files get the
    permissions the umask gives any new file. A file that is not a zip archive raises
    ``zipfile.BadZipFile``.
    """
    dest_dir = Path(dest_dir)
    extracted = []
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            _check_member_name(member.filename)
        _check_layout(members, dest_dir)
        for member in members:
            if member.is_dir():
                continue
            target = dest_dir / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp, open(tmp, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out)
            extracted.append(target)
    return extracted
