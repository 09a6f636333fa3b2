"""Refusals on the Anthropic door are Anthropic-shaped with Anthropic's statuses (and the OpenAI routes keep
OpenAI's shape); x-api-key authenticates like Bearer, with tenancy's limits and ledger applied unchanged."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import httpx2
import pytest

from herd.engine.errors import Code, HerdError
from herd.platform.gateway.anthropic_errors import anthropic_body, anthropic_status
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import header_credential, limit_exceeded, overloaded, payload_too_large
from herd.platform.gateway.http_app import create_app
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import TenantStore

HELLO = [{"role": "user", "content": "Tell me about the herd."}]


def _clients(app, api_key="unused"):
    return (anthropic.AsyncAnthropic(api_key=api_key, base_url="http://herd", max_retries=0,
                                     http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd"))


def _shape(body: dict, kind: str) -> None:
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    assert body["error"]["message"]


def test_missing_max_tokens_and_other_bad_bodies_are_anthropic_400s(gateway):
    app = create_app(gateway, max_request_body_bytes=4096)

    async def main():
        client, http = _clients(app)
        async with client, http:
            with pytest.raises(anthropic.BadRequestError) as missing:
                await client.messages.create(model="scout", max_tokens=anthropic.omit, messages=HELLO, timeout=30)
            with pytest.raises(anthropic.NotFoundError) as unknown:
                await client.messages.create(model="nope", max_tokens=4, messages=HELLO)
            raw = {name: await http.post("/v1/messages", **kwargs) for name, kwargs in {
                "not_json": {"content": b"{", "headers": {"content-type": "application/json"}},
                "unknown_field": {"json": {"model": "scout", "max_tokens": 4, "messages": HELLO, "n": 2}},
                "bad_role": {"json": {"model": "scout", "max_tokens": 4,
                                      "messages": [{"role": "system", "content": "hi"}]}},
                "prefill": {"json": {"model": "scout", "max_tokens": 4,
                                     "messages": [*HELLO, {"role": "assistant", "content": "The herd"}]}},
                "choice_without_tools": {"json": {"model": "scout", "max_tokens": 4, "messages": HELLO,
                                                  "tool_choice": {"type": "any"}}},
                "thinking": {"json": {"model": "scout", "max_tokens": 4, "messages": HELLO,
                                      "thinking": {"type": "enabled", "budget_tokens": 1024}}},
                "too_large": {"content": b" " * 5000, "headers": {"content-type": "application/json"}},
            }.items()}
            wrong_method = await http.get("/v1/messages")
            openai_route = await http.post("/v1/chat/completions", json={"model": "scout", "messages": HELLO,
                                                                          "n": 0})
            return missing.value, unknown.value, raw, wrong_method, openai_route

    missing, unknown, raw, wrong_method, openai_route = asyncio.run(main())
    assert missing.status_code == 400
    _shape(missing.body, "invalid_request_error")
    assert "max_tokens" in missing.body["error"]["message"]
    assert unknown.status_code == 404
    _shape(unknown.body, "not_found_error")
    for name, response in raw.items():
        assert response.status_code == (413 if name == "too_large" else 400), (name, response.text)
        _shape(response.json(), "invalid_request_error")
    assert "prefill" in raw["prefill"].json()["error"]["message"]
    assert "n" in raw["unknown_field"].json()["error"]["message"]
    assert wrong_method.status_code == 405
    _shape(wrong_method.json(), "invalid_request_error")
    assert openai_route.status_code == 400 and set(openai_route.json()) == {"error"}, "OpenAI routes keep theirs"
    assert openai_route.json()["error"]["param"] == "n"


def test_refusals_map_to_anthropics_statuses_and_types():
    cases = [
        (HerdError(Code.UNAUTHENTICATED, "x"), 401, "authentication_error"),
        (HerdError(Code.PERMISSION_DENIED, "x"), 403, "permission_error"),
        (limit_exceeded("requests_per_min", 2.5, "per-minute rate"), 429, "rate_limit_error"),
        (overloaded(), 529, "overloaded_error"),
        (HerdError(Code.UNAVAILABLE, "x", retry_after_s=1), 529, "overloaded_error"),
        (HerdError(Code.INTERNAL, "x"), 500, "api_error"),
        (HerdError(Code.DEADLINE_EXCEEDED, "x"), 504, "timeout_error"),
        (payload_too_large(10), 413, "invalid_request_error"),
    ]
    for err, status, kind in cases:
        assert (anthropic_status(err), anthropic_body(err)["error"]["type"]) == (status, kind), err


@pytest.fixture
def tenancy(tmp_path, core):
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    ledger = UsageLedger(store, flush_interval_s=0.05)
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8)},
                      guard=Guard(store, InProcessRateLimiter(), ledger))
    store.create_tenant("a", allowed_models=["scout"], requests_per_min=2)
    store.create_tenant("b", allowed_models=["other"])
    return store, ledger, gateway, {t: store.issue_key(t)[1] for t in ("a", "b")}


def test_x_api_key_authenticates_and_tenancy_applies_unchanged(tenancy):
    store, ledger, gateway, keys = tenancy
    app = create_app(gateway)

    async def main():
        ledger.start()
        good, http = _clients(app, keys["a"])
        bad, _ = _clients(app, "hk_not_a_key")
        other, _ = _clients(app, keys["b"])
        async with good, bad, other, http:
            first = await good.messages.create(model="scout", max_tokens=4, messages=HELLO)
            streamed = await good.messages.create(model="scout", max_tokens=4, messages=HELLO, stream=True)
            events = [e async for e in streamed]
            with pytest.raises(anthropic.RateLimitError) as limited:
                await good.messages.create(model="scout", max_tokens=4, messages=HELLO)
            with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
                await bad.messages.create(model="scout", max_tokens=4, messages=HELLO)
            with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
                await other.messages.create(model="scout", max_tokens=4, messages=HELLO)
            no_key = await http.post("/v1/messages", json={"model": "scout", "max_tokens": 4, "messages": HELLO})
            bearer = await http.get("/v1/models", headers={"authorization": f"Bearer {keys['b']}"})
            openai_bad_key = await http.get("/v1/models", headers={"x-api-key": "hk_nope"})
        await ledger.close()
        return first, events, limited.value, unauthenticated.value, forbidden.value, no_key, bearer, openai_bad_key

    first, events, limited, unauthenticated, forbidden, no_key, bearer, openai_bad_key = asyncio.run(main())
    assert first.usage.output_tokens >= 1 and events[-1].type == "message_stop"
    assert limited.status_code == 429 and int(limited.response.headers["retry-after"]) >= 1
    _shape(limited.body, "rate_limit_error")
    for err, status, kind in ((unauthenticated, 401, "authentication_error"), (forbidden, 403, "permission_error")):
        assert err.status_code == status
        _shape(err.body, kind)
    assert no_key.status_code == 401
    _shape(no_key.json(), "authentication_error")
    assert bearer.status_code == 200, "Bearer still works"
    assert openai_bad_key.status_code == 401 and set(openai_bad_key.json()) == {"error"}
    rows = store.usage_rows("a")
    assert [r.status for r in rows] == ["ok", "ok"], "one ledger row per served request, none for the refusal"
    assert rows[0].prompt_tokens == first.usage.input_tokens
    assert rows[0].completion_tokens == first.usage.output_tokens


def test_the_document_shows_the_door_its_stream_and_its_error_shape(gateway):
    document = create_app(gateway).openapi()
    post = document["paths"]["/v1/messages"]["post"]
    assert set(post["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    message = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert message.endswith("Message"), message  # module-qualified should another door name a model Message
    for code in ("400", "401", "403", "404", "413", "429", "500", "529"):
        schema = post["responses"][code]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/AnthropicError"}, code
    assert "422" not in post["responses"]
    assert "max_tokens" in document["components"]["schemas"]["MessagesRequest"]["required"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]
    assert chat["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, "OpenAI routes keep their error shape"


def test_the_credential_is_bearer_first_then_x_api_key():
    assert header_credential("Bearer hk_a", "hk_b") == "hk_a"
    assert header_credential(None, " hk_b ") == "hk_b"
    assert header_credential("Basic abc", "hk_b") is None, "an Authorization header that is not Bearer is no key"
    assert header_credential(None, "hk_\u00e9") is header_credential(None, "") is header_credential(None, None) is None
