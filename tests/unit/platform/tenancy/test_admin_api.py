"""The admin API's credential check: only the exact token passes; anything else, however malformed, is 401."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import http_status, openai_body
from herd.platform.tenancy.admin_api import admin_router
from herd.platform.tenancy.store import TenantStore

TOKEN = "admin-" + "a" * 40


@pytest.fixture
def client(store: TenantStore) -> TestClient:
    app = FastAPI()
    app.include_router(admin_router(store, TOKEN))

    @app.exception_handler(HerdError)
    async def refusal(_request: Request, err: HerdError) -> JSONResponse:
        return JSONResponse(openai_body(err), status_code=http_status(err))

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("header", [
    b"Bearer ", b"Bearer", b"Bearer    ", b"Basic " + TOKEN.encode(), TOKEN.encode(), b"Bearer " + TOKEN[:-1].encode(),
    "Bearer \u00e9t\u00e9".encode("latin-1"),  # not ASCII: compare_digest on str raised TypeError (a 500)
    b"Bearer \xff\xfe" + TOKEN.encode(),
    b"Bearer " + TOKEN.encode() + "\u00e9".encode("latin-1"),
])
def test_anything_but_the_token_is_401(client, header):
    response = client.get("/admin/v1/tenants", headers=[(b"authorization", header)])
    assert response.status_code == 401, response.text
    assert response.json()["error"]["message"] == "Admin credential required."


def test_no_authorization_header_is_401(client):
    assert client.get("/admin/v1/tenants").status_code == 401


def test_the_token_is_200(client):
    response = client.get("/admin/v1/tenants", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json() == []
