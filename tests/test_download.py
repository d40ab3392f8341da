"""Downloads against a real local HTTP server, and safe zip extraction."""

import hashlib
import os
import re
import stat
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


def test_zero_retries_still_tries_once_and_reports_the_url(closed_port_url, tmp_path):
    url = f"{closed_port_url}/file.txt"
    with pytest.raises(download.DownloadError, match=f"- {url}: unreachable"):
        download.download(url, tmp_path / "file.txt", retries=0, progress=False)


def test_server_that_never_answers_times_out_instead_of_hanging(silent_server_url, tmp_path):
    with pytest.raises(download.DownloadError, match="timed out"):
        download.download(
            f"{silent_server_url}/file.txt", tmp_path / "file.txt", timeout=0.5, retries=1, progress=False
        )
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_is_retried_and_leaves_no_partial_file(server, tmp_path):
    dest = tmp_path / "file.txt"
    with pytest.raises(download.DownloadError, match="connection closed after"):
        download.download(f"{server}/truncated.txt", dest, retries=2, progress=False)
    assert _Handler.hits == ["/truncated.txt", "/truncated.txt"]
    assert _leftovers(tmp_path) == []


def test_destination_that_is_a_folder_is_refused_at_once(server, tmp_path):
    with pytest.raises(
        download.DestinationError, match="is a folder; download\\(\\) needs the path of the file"
    ):
        download.download(f"{server}/file.txt", tmp_path, progress=False)
    assert _Handler.hits == []


def test_destination_under_a_file_is_a_destination_error_not_a_network_hint(server, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(download.DestinationError, match="Cannot write") as caught:
        download.download(f"{server}/file.txt", tmp_path / "a-file" / "file.txt", progress=False)
    assert "offline" not in str(caught.value) and "not the network" in str(caught.value)
    assert _Handler.hits == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_read_only_destination_is_a_destination_error_not_a_network_hint(server, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(download.DestinationError, match="Cannot write") as caught:
            download.download(f"{server}/file.txt", folder / "file.txt", progress=False)
    finally:
        folder.chmod(0o755)
    assert "offline" not in str(caught.value)


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_downloaded_and_extracted_files_follow_the_umask(server, tmp_path, umask, mask, mode):
    umask(mask)
    dest = download.download(f"{server}/file.txt", tmp_path / "file.txt", progress=False)
    assert stat.S_IMODE(dest.stat().st_mode) == mode
    extracted = download.safe_extract_zip(_zip_with(tmp_path / "ok.zip", ["sub/a.txt"]), tmp_path / "out")
    assert stat.S_IMODE(extracted[0].stat().st_mode) == mode


def test_finished_download_leaves_one_short_line_with_name_size_and_time(server, tmp_path, capsys):
    download.download(f"{server}/file.txt", tmp_path / "file.txt")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    last = err.rsplit("\r", 1)[-1].rstrip()  # what a terminal or JupyterLab shows after each \r
    assert re.fullmatch(r"file\.txt: 76\.0 kB in \d+\.\d s", last), repr(err)
    download.download(f"{server}/file.txt", tmp_path / "quiet.txt", progress=False)
    assert capsys.readouterr().err == ""


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


@pytest.mark.parametrize(
    "names",
    [["a", "a/b.txt"], ["a/b.txt", "a"], ["x/y", "x/y/z.txt"], ["d/", "d/e.txt", "d/e.txt/f.txt"]],
    ids=["file-then-folder", "folder-then-file", "nested", "deeper"],
)
def test_archive_with_a_name_that_is_both_file_and_folder_is_refused_before_writing(tmp_path, names):
    archive = _zip_with(tmp_path / "clash.zip", names)
    out = tmp_path / "out"
    with pytest.raises(download.UnsafeArchiveError, match="also has a folder of that name"):
        download.safe_extract_zip(archive, out)
    assert not out.exists()


def test_archive_that_clashes_with_files_already_there_is_refused_before_writing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the archive needs a folder")
    with pytest.raises(download.UnsafeArchiveError, match="needs a folder at"):
        download.safe_extract_zip(_zip_with(tmp_path / "ok.zip", ["a.txt", "sub/b.txt"]), out)
    assert sorted(p.name for p in out.iterdir()) == ["sub"]


def test_archive_extracts_nested_members(tmp_path):
    archive = _zip_with(tmp_path / "ok.zip", ["a.txt", "sub/b.txt"])
    paths = download.safe_extract_zip(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in paths) == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"content of sub/b.txt"
