"""OpenAI ``image_url`` parts -> image bytes: data: URLs always, http(s) URLs only where allowed.

A data: URL must carry base64 (``data:image/png;base64,...``). An http(s) URL is fetched only when the
operator enabled it (``images.fetch_urls``): the gateway then reaches out to whatever the URL names, so it
is off by default; when on, one fetch may take at most ``fetch_timeout_s`` in all and ``max_bytes``
(``images.max_image_bytes``), and follows no redirects. Every failure is the client's request's fault:
a HerdError (INVALID_ARGUMENT, HTTP 400).

A fetch must not become a way into the gateway's own network (SSRF). The host is resolved once, off the
event loop, and the fetch goes ahead only if every address it resolves to is public (or inside one of the
operator's ``allow_networks``); the connection then goes to the address that was checked (the URL's host
still names the Host header and the TLS server name, so certificates are verified for the host), so a name
that resolves differently a moment later (DNS rebinding) reaches nothing new. Proxies and .netrc in the
environment are ignored. Every failure to reach the URL, whatever its cause (refused address, unknown
host, closed port, reset), reads the same to the client, so the door cannot map a network; the cause is
logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import httpx

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import invalid_request

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15",
    "64:ff9b::/96", "64:ff9b:1::/48",  # NAT64: an IPv4 address (maybe private) inside an IPv6 one
    "2001::/32", "2002::/16",  # Teredo and 6to4: the same
))
"""Ranges refused besides what `ipaddress` already counts as not global (shared, benchmarking, translated)."""

FETCH_FAILED = "could not fetch the image URL"
"""The one message for every network-level failure of a fetch (its cause is logged, not returned)."""


@dataclass(frozen=True, kw_only=True)
class ImageUrlPolicy:
    """Which image URLs the gateway reads, and how far it goes for one."""

    fetch_urls: bool = False
    """Fetch http(s) URLs (off: only data: URLs are accepted)."""
    fetch_timeout_s: float = 10.0
    """The longest one fetch may take, name resolution to last byte."""
    max_bytes: int = 20 * 2**20
    """The largest image, in encoded bytes, from either kind of URL."""
    allow_networks: Sequence[str] = ()
    """Networks (CIDR) a fetch may reach although they are not public (everything else non-public is refused)."""
    tls_context: ssl.SSLContext | None = field(default=None, compare=False)
    """Whom https fetches trust (None: the public roots certifi ships)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_networks", tuple(self.allow_networks))
        _ = self.allowed  # a bad CIDR fails here, at startup, not on the first fetch

    @cached_property
    def allowed(self) -> tuple[IPNetwork, ...]:
        """`allow_networks`, parsed."""
        out = []
        for text in self.allow_networks:
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"images.fetch_allow_networks: {text!r} is not a network (CIDR)") from None
        return tuple(out)

    def may_reach(self, address: IPAddress) -> bool:
        """Whether a fetch may connect to `address`: a public one, or one inside `allow_networks`."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return True
        return address.is_global and not (
            address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified or any(address in n for n in _NOT_PUBLIC))


async def image_bytes(url: str, policy: ImageUrlPolicy) -> bytes:
    """The encoded image an ``image_url.url`` stands for; HerdError (INVALID_ARGUMENT, 400) when it cannot be had."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy)
    if scheme in ("http", "https"):
        if not policy.fetch_urls:
            raise invalid_request("image URLs over http(s) are not fetched by this server; send the image inline "
                                  "as a data: URL (data:image/png;base64,...)", param="messages")
        return await _fetch(url, policy)
    raise invalid_request(f"image_url must be a data: URL or an http(s) URL, got {url[:40]!r}", param="messages")


def _data_url(url: str, policy: ImageUrlPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise invalid_request("image_url data: URL has no ',' before its data", param="messages")
    media, *params = header[len("data:"):].split(";")
    if "base64" not in params:
        raise invalid_request("image_url data: URL must be base64 (data:image/png;base64,...)", param="messages")
    if media and not media.lower().startswith("image/"):
        raise invalid_request(f"image_url data: URL has media type {media!r}, not an image", param="messages")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise _too_large(policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid_request(f"image_url data: URL holds corrupt base64: {err}", param="messages") from None
    if not data:
        raise invalid_request("image_url data: URL holds no data", param="messages")
    return data


class _Unreachable(Exception):
    """The URL names no address a fetch may reach (the reason is for the log only)."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, by the system resolver, run off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _checked_addresses(url: httpx.URL, policy: ImageUrlPolicy) -> list[str]:
    """The addresses the fetch may connect to, in the resolver's order: all the host resolves to, once every
    one of them passed the check (one refused address refuses the host)."""
    host = url.raw_host.decode("ascii")
    try:
        found = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except OSError as err:
        raise _Unreachable(f"{host} does not resolve: {err}") from None
    addresses = []
    for text in found:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise _Unreachable(f"{host} resolves to {text!r}, not an IP address") from None
    refused = [str(a) for a in addresses if not policy.may_reach(a)]
    if refused or not addresses:
        raise _Unreachable(f"{host} resolves to {', '.join(refused) or 'nothing'}: not public and not in "
                           "images.fetch_allow_networks")
    return list(dict.fromkeys(str(a) for a in addresses))


async def _fetch(url: str, policy: ImageUrlPolicy) -> bytes:
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            target = httpx.URL(url)
            *others, last = await _checked_addresses(target, policy)
            async with httpx.AsyncClient(timeout=policy.fetch_timeout_s, follow_redirects=False, trust_env=False,
                                         verify=policy.tls_context or True) as client:
                for address in others:  # the next address when one cannot be connected to (IPv6 without a route)
                    with contextlib.suppress(httpx.ConnectError):
                        return await _get(client, target, address, policy)
                return await _get(client, target, last, policy)
    except HerdError:
        raise
    except (TimeoutError, httpx.TimeoutException):
        raise invalid_request(f"image_url {url[:80]!r} took longer than {policy.fetch_timeout_s:g} s",
                              param="messages") from None
    except (_Unreachable, httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, OSError) as err:
        log.warning("image fetch of %.80r failed: %s: %s", url, type(err).__name__, err)
        raise invalid_request(FETCH_FAILED, param="messages") from None


async def _get(client: httpx.AsyncClient, url: httpx.URL, address: str, policy: ImageUrlPolicy) -> bytes:
    """GET `url` from `address`: the connection goes there, while the Host header and TLS (the server name sent
    and the one the certificate must carry) keep the URL's host."""
    async with client.stream("GET", url.copy_with(host=address), headers={"Host": url.netloc.decode("ascii")},
                             extensions={"sni_hostname": url.raw_host.decode("ascii")}) as response:
        if response.status_code != 200:
            raise invalid_request(f"image_url {str(url)[:80]!r} answered HTTP {response.status_code}",
                                  param="messages")
        data = bytearray()
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > policy.max_bytes:
                raise _too_large(policy)
        return bytes(data)


def _too_large(policy: ImageUrlPolicy) -> HerdError:
    return invalid_request(f"image is larger than {policy.max_bytes} bytes", param="messages")
