"""image_url parts: data: URLs read, http(s) URLs refused unless enabled, then fetched within limits, and
only from public addresses (or the operator's allow-list), pinned to the address that was checked."""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import http_status
from herd.platform.gateway.image_urls import ImageUrlPolicy, image_bytes

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
LOCAL = {"fetch_urls": True, "allow_networks": ["127.0.0.0/8"]}
"""A policy that fetches, from the test servers on loopback too."""
FETCH_FAILED = "could not fetch the image URL"


def _read(url: str, **policy: Any) -> bytes:
    return asyncio.run(image_bytes(url, ImageUrlPolicy(**policy)))


def _refused(url: str, **policy: Any) -> str:
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
    hosts: ClassVar[list[str]] = []
    """The Host header of every request served (any server of this handler)."""

    def do_GET(self) -> None:
        _Handler.hosts.append(self.headers.get("Host", ""))
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


def _serve(host: str, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    httpd = ThreadingHTTPServer((host, 0), _Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    for port in _serve("127.0.0.1"):
        yield f"http://127.0.0.1:{port}"


def test_http_urls_are_refused_unless_enabled(server):
    assert "not fetched by this server" in _refused(f"{server}/cat.png")
    assert _read(f"{server}/cat.png", **LOCAL) == PNG


def test_fetches_keep_to_their_limits(server):
    assert "HTTP 404" in _refused(f"{server}/missing.png", **LOCAL)
    assert "HTTP 302" in _refused(f"{server}/moved.png", **LOCAL)  # redirects are not followed
    assert "larger than 100 bytes" in _refused(f"{server}/cat.png", **LOCAL, max_bytes=100)
    assert "longer than 0.2 s" in _refused(f"{server}/slow.png", **LOCAL, fetch_timeout_s=0.2)


@pytest.mark.parametrize("form", [
    "127.0.0.1:{port}", "localhost:{port}", "127.1:{port}", "0.0.0.0:{port}",
    "2130706433:{port}", "0x7f000001:{port}", "017700000001:{port}",  # 127.0.0.1 in decimal, hex and octal
    "[::ffff:127.0.0.1]:{port}", "[::1]:{port}",
    "169.254.169.254", "10.0.0.1", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1",
    "[fe80::1]", "[fc00::1]", "[fd12:3456::1]", "[::]",
])
def test_non_public_addresses_are_refused(server, form, caplog):
    """Loopback forms point at the live test server (a fetch that got through would read the image); the
    rest point nowhere, so the log must show the address check refused them, not a failed connection."""
    caplog.set_level(logging.WARNING, logger="herd.platform.gateway.image_urls")
    port = server.rsplit(":", 1)[1]
    url = f"http://{form.format(port=port)}/cat.png"
    assert _refused(url, fetch_urls=True, fetch_timeout_s=2) == FETCH_FAILED
    assert "not public" in caplog.text


def test_the_allow_list_opens_only_its_networks(server):
    port = server.rsplit(":", 1)[1]
    assert _read(f"http://localhost:{port}/cat.png", fetch_urls=True, allow_networks=["127.0.0.1/32"]) == PNG
    assert _refused(f"http://127.0.0.2:{port}/cat.png", fetch_urls=True, allow_networks=["127.0.0.1/32"]) \
        == FETCH_FAILED
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a network"):
        ImageUrlPolicy(fetch_urls=True, allow_networks=["10.0.0.0/33"])


class _Resolver:
    """socket.getaddrinfo for `images.test`: the allowed 127.0.0.2 on the first lookup, 127.0.0.1 (not
    allowed) on every later one, the shape of a DNS rebinding attack."""

    def __init__(self) -> None:
        self.real = socket.getaddrinfo
        self.lookups = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("images.test", b"images.test"):
            return self.real(host, port, *args, **kwargs)
        self.lookups += 1
        address = "127.0.0.2" if self.lookups == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]


@pytest.fixture
def rebinding(monkeypatch) -> _Resolver:
    resolver = _Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


@pytest.fixture(scope="module")
def second_server() -> Iterator[int]:
    """A server on 127.0.0.2 only: a connection that went to 127.0.0.1 instead would find nothing."""
    yield from _serve("127.0.0.2")


def test_the_fetch_connects_to_the_address_that_was_checked(rebinding, second_server):
    _Handler.hosts.clear()
    policy = {"fetch_urls": True, "allow_networks": ["127.0.0.2/32"]}
    assert _read(f"http://images.test:{second_server}/cat.png", **policy) == PNG
    assert _Handler.hosts == [f"images.test:{second_server}"]  # the Host header names the URL's host, not the IP
    assert rebinding.lookups == 1


def test_each_checked_address_is_tried_in_turn(second_server, monkeypatch):
    """A host with an address that cannot be reached (IPv6 without a route, say) is fetched from the next one."""
    real = socket.getaddrinfo

    def two_addresses(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "two.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, int(port)))
                for a in ("127.0.0.3", "127.0.0.2")]  # nothing listens on 127.0.0.3

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    assert _read(f"http://two.test:{second_server}/cat.png", **LOCAL) == PNG
    policy = {"fetch_urls": True, "allow_networks": ["127.0.0.2/32"]}  # one address refused: the host is refused
    assert _refused(f"http://two.test:{second_server}/cat.png", **policy) == FETCH_FAILED


def _tls_pair(tmp: Path, host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a certificate for `host`, client context trusting only its CA)."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - day).not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - day).not_valid_after(now + day)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


def test_https_is_verified_for_the_host_while_connecting_to_the_checked_address(rebinding, tmp_path):
    server_tls, client_tls = _tls_pair(tmp_path, "images.test")
    names: list[str | None] = []

    def note_server_name(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_tls.sni_callback = note_server_name
    for port in _serve("127.0.0.2", server_tls):
        policy = {"fetch_urls": True, "allow_networks": ["127.0.0.2/32"], "tls_context": client_tls}
        assert _read(f"https://images.test:{port}/cat.png", **policy) == PNG
        assert names == ["images.test"]
        # The certificate names images.test: the same server under another name fails verification.
        assert _refused(f"https://127.0.0.2:{port}/cat.png", **policy) == FETCH_FAILED


def test_proxies_in_the_environment_are_ignored(server, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _read(f"{server}/cat.png", **LOCAL) == PNG


@pytest.fixture(scope="module")
def resetting_port() -> Iterator[int]:
    """A port that accepts a connection, then resets it (an open port that speaks no HTTP)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def test_closed_and_open_ports_read_the_same(resetting_port):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    closed_message = _refused(f"http://127.0.0.1:{closed}/cat.png", **LOCAL)
    open_message = _refused(f"http://127.0.0.1:{resetting_port}/cat.png", **LOCAL)
    assert closed_message == open_message == FETCH_FAILED
