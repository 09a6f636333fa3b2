"""image_url parts: data: URLs read, http(s) URLs refused unless enabled, then fetched within limits."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import http_status
from herd.platform.gateway.image_urls import ImageUrlPolicy, image_bytes

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def _read(url: str, **policy) -> bytes:
    return asyncio.run(image_bytes(url, ImageUrlPolicy(**policy)))


def _refused(url: str, **policy) -> str:
    with pytest.raises(HerdError) as caught:
        _read(url, **policy)
    assert http_status(caught.value) == 400 and caught.value.code == "INVALID_ARGUMENT"
    return caught.value.message


def test_data_urls_are_read():
    encoded = base64.b64encode(PNG).decode()
    assert _read(f"data:image/png;base64,{encoded}") == PNG
    assert _read(f"data:;base64,{encoded}") == PNG  # no media type: the bytes decide


@pytest.mark.parametrize(("url", "needle"), [
    ("data:image/png;base64,****", "corrupt base64"),
    ("data:image/png;base64,AAA", "corrupt base64"),
    ("data:image/png,plain", "must be base64"),
    ("data:text/plain;base64,AAAA", "not an image"),
    ("data:image/png;base64", "no ','"),
    ("data:image/png;base64,", "no data"),
    ("ftp://example.invalid/cat.png", "data: URL or an http(s) URL"),
    ("cat.png", "data: URL or an http(s) URL"),
])
def test_bad_data_urls_are_refused(url, needle):
    assert needle in _refused(url)


def test_the_size_limit_holds_for_data_urls():
    url = f"data:image/png;base64,{base64.b64encode(PNG).decode()}"
    assert "larger than 100 bytes" in _refused(url, max_bytes=100)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow.png":
            time.sleep(1.0)
        if self.path == "/missing.png":
            self.send_error(404)
            return
        if self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout case)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_urls_are_refused_unless_enabled(server):
    assert "not fetched by this server" in _refused(f"{server}/cat.png")
    assert _read(f"{server}/cat.png", fetch_urls=True) == PNG


def test_fetches_keep_to_their_limits(server):
    assert "HTTP 404" in _refused(f"{server}/missing.png", fetch_urls=True)
    assert "HTTP 302" in _refused(f"{server}/moved.png", fetch_urls=True)  # redirects are not followed
    assert "larger than 100 bytes" in _refused(f"{server}/cat.png", fetch_urls=True, max_bytes=100)
    assert "longer than 0.2 s" in _refused(f"{server}/slow.png", fetch_urls=True, fetch_timeout_s=0.2)
    assert "could not be fetched" in _refused("http://127.0.0.1:9/cat.png", fetch_urls=True)
