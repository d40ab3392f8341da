"""Downloads against a real local HTTP server, and safe zip extraction."""

import hashlib
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared import download

PAYLOAD = b"The Verdict, served by a test server.\n" * 2000
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.hits.append(self.path)
        if self.path == "/file.txt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/truncated.txt":
            # Promise the whole file, send half, hang up.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_download_writes_file_when_checksum_matches(server, tmp_path):
    dest = tmp_path / "file.txt"
    assert download.download(f"{server}/file.txt", dest, sha256=PAYLOAD_SHA256, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["file.txt"]


def test_download_skips_a_file_that_is_already_there_and_valid(server, tmp_path):
    dest = tmp_path / "file.txt"
    download.download(f"{server}/file.txt", dest, sha256=PAYLOAD_SHA256, progress=False)
    download.download(f"{server}/file.txt", dest, sha256=PAYLOAD_SHA256, progress=False)
    assert _Handler.hits == ["/file.txt"]


def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path):
    dest = tmp_path / "file.txt"
    with pytest.raises(download.ChecksumError, match="sha256 mismatch"):
        download.download(f"{server}/file.txt", dest, sha256="0" * 64, progress=False)
    assert _leftovers(tmp_path) == []


def test_404_on_first_url_falls_back_to_second(server, tmp_path):
    dest = tmp_path / "file.txt"
    download.download(
        f"{server}/missing.txt",
        dest,
        sha256=PAYLOAD_SHA256,
        fallback_urls=[f"{server}/file.txt"],
        progress=False,
    )
    assert dest.read_bytes() == PAYLOAD
    assert _Handler.hits == ["/missing.txt", "/file.txt"]  # a 404 is not retried


def test_unreachable_server_gives_clear_offline_error(closed_port_url, tmp_path):
    dest = tmp_path / "the-verdict.txt"
    url = f"{closed_port_url}/the-verdict.txt"
    with pytest.raises(download.DownloadError) as caught:
        download.download(url, dest, sha256=PAYLOAD_SHA256, retries=2, progress=False)
    message = str(caught.value)
    assert "Could not download the-verdict.txt" in message
    assert url in message and "unreachable" in message
    assert str(dest) in message and "offline" in message and "LLMS_GITHUB_BASE_URL" in message
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_is_retried_and_leaves_no_partial_file(server, tmp_path):
    dest = tmp_path / "file.txt"
    with pytest.raises(download.DownloadError, match="connection closed after"):
        download.download(f"{server}/truncated.txt", dest, retries=2, progress=False)
    assert _Handler.hits == ["/truncated.txt", "/truncated.txt"]
    assert _leftovers(tmp_path) == []


def test_host_base_url_can_be_overridden(monkeypatch):
    monkeypatch.setenv("LLMS_GITHUB_BASE_URL", "http://mirror.example/raw/")
    assert download.host_url("github", "/a/b.txt") == "http://mirror.example/raw/a/b.txt"
    monkeypatch.delenv("LLMS_GITHUB_BASE_URL")
    assert download.host_url("github", "a/b.txt") == "https://raw.githubusercontent.com/a/b.txt"


def _zip_with(path, names):
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"content of " + name.encode())
    return path


@pytest.mark.parametrize("bad_name", ["../evil", "docs/../../evil", "/etc/evil", "C:/evil", "..\\evil"])
def test_archive_with_escaping_member_is_refused(tmp_path, bad_name):
    archive = _zip_with(tmp_path / "bad.zip", ["fine.txt", bad_name])
    out = tmp_path / "out"
    with pytest.raises(download.UnsafeArchiveError, match="refusing archive member"):
        download.safe_extract_zip(archive, out)
    assert not out.exists()  # nothing is written when any member is unsafe
    assert not (tmp_path / "evil").exists()


def test_archive_extracts_nested_members(tmp_path):
    archive = _zip_with(tmp_path / "ok.zip", ["a.txt", "sub/b.txt"])
    paths = download.safe_extract_zip(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in paths) == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"content of sub/b.txt"
