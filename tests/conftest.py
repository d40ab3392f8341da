"""Local network stand-ins the download tests share: a static file server, a server that
never answers, and a port where nothing listens. Everything binds to 127.0.0.1."""

import functools
import http.server
import socket
import threading

import pytest


class _QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve_folder():
    """``serve_folder(folder)`` serves the files under ``folder`` over HTTP and returns the base URL."""
    servers = []

    def serve(folder) -> str:
        handler = functools.partial(_QuietFileHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_server_url():
    """A URL on 127.0.0.1 whose server accepts connections but never sends a byte.

    The listening socket's backlog completes the TCP handshake without anyone calling
    accept(), which is exactly what a client sees behind a proxy that swallows requests.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
