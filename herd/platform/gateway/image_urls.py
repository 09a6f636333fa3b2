"""OpenAI ``image_url`` parts -> image bytes: data: URLs always, http(s) URLs only where allowed.

A data: URL must carry base64 (``data:image/png;base64,...``). An http(s) URL is fetched only when the
operator enabled it (``images.fetch_urls``): the gateway then reaches out to whatever the URL names, so it
is off by default; when on, one fetch may take at most ``fetch_timeout_s`` in all and ``max_bytes``
(``images.max_image_bytes``), and follows no redirects. Every failure is the client's request's fault:
a HerdError (INVALID_ARGUMENT, HTTP 400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass

import httpx

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import invalid_request


@dataclass(frozen=True, kw_only=True)
class ImageUrlPolicy:
    """Which image URLs the gateway reads, and how far it goes for one."""

    fetch_urls: bool = False
    """Fetch http(s) URLs (off: only data: URLs are accepted)."""
    fetch_timeout_s: float = 10.0
    """The longest one fetch may take, connection to last byte."""
    max_bytes: int = 20 * 2**20
    """The largest image, in encoded bytes, from either kind of URL."""


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


async def _fetch(url: str, policy: ImageUrlPolicy) -> bytes:
    try:
        async with asyncio.timeout(policy.fetch_timeout_s), httpx.AsyncClient(
            timeout=policy.fetch_timeout_s, follow_redirects=False
        ) as client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise invalid_request(f"image_url {url[:80]!r} answered HTTP {response.status_code}", param="messages")
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > policy.max_bytes:
                    raise _too_large(policy)
            return bytes(data)
    except HerdError:
        raise
    except TimeoutError:
        raise invalid_request(f"image_url {url[:80]!r} took longer than {policy.fetch_timeout_s:g} s",
                              param="messages") from None
    except httpx.HTTPError as err:
        raise invalid_request(f"image_url {url[:80]!r} could not be fetched: {err}", param="messages") from None


def _too_large(policy: ImageUrlPolicy) -> HerdError:
    return invalid_request(f"image is larger than {policy.max_bytes} bytes", param="messages")
