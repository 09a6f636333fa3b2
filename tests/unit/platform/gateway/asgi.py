"""One POST to a gateway's HTTP app in-process (httpx's ASGI transport), for the door tests."""

from __future__ import annotations

import asyncio

import httpx

from herd.platform.gateway.http_app import create_app


def post(gateway, path: str, body: dict) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://herd") as client:
            return await client.post(path, json=body)

    return asyncio.run(main())
