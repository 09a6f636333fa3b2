"""schemathesis against the HTTP door's own OpenAPI document, and the operator listener's (where the admin API
is), in process (ASGI, no network).

Every operation, public and admin, gets cases that fit its schema and cases that break it; each answer
must be no 5xx, a documented status, a documented content type and a body (or each event of a
stream) that matches the documented schema. Half the cases name the served model, with small
token budgets, so generation is fuzzed too, not only refusals.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from herd.platform.batch.file_store import LocalFileStore
from herd.platform.batch.service import Batches
from herd.platform.batch.store import BatchStore
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import MAX_REQUEST_BODY_BYTES, create_app
from herd.platform.gateway.ops_app import create_ops_app
from herd.platform.settings import HerdSettings
from herd.platform.tenancy.admin_api import admin_router
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.store import TenantStore
from tests.unit.platform.gateway.replica_state import settled

ADMIN_TOKEN = "admin-fuzz-token"
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)
MAX_TOKENS = 4  # cases that reach the model generate at most this many tokens, so hundreds of them stay quick
# Cases per operation and generation mode. Fixed (derandomized) so a failure reproduces run after run.
EXAMPLES = {"/v1/chat/completions": 250, "/v1/completions": 250}
DEFAULT_EXAMPLES = 25


@dataclass
class Tally:
    cases: int = 0
    streams: int = 0  # answers that were event streams (each event checked against the schema)
    codes: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)


@pytest.fixture(scope="module")
def fuzzed_gateway(core):
    return Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)})


@pytest.fixture(scope="module")
def schema(fuzzed_gateway, tmp_path_factory):
    """The public door with the Files and Batch APIs (rows on SQLite; no runner: batches stay queued)."""
    directory = tmp_path_factory.mktemp("fuzz-batches")
    engine = connect(f"sqlite:///{directory / 'herd.db'}")
    migrate(engine)
    batches = Batches(BatchStore(engine), LocalFileStore(directory / "files"))
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzzed_gateway, batches=batches))


@pytest.fixture(scope="module")
def ops_schema(fuzzed_gateway, tmp_path_factory):
    """The operator listener with the admin API."""
    store = TenantStore(connect(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'herd.db'}"))
    migrate(store.engine)
    store.create_tenant("acme", allowed_models=["scout"])
    app = create_ops_app(fuzzed_gateway, routers=[admin_router(store, ADMIN_TOKEN)])
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema, keep: Callable[[str], bool]):
    operations = [result.ok() for result in schema.get_all_operations()]
    return [op for op in operations if keep(op.path)]


def _aim_at_the_model(case, aim: str) -> None:
    """Keep every token budget small; with `aim` "model" or "stream", name the served model (and stream)."""
    body = case.body
    if not isinstance(body, dict) or case.operation.path not in EXAMPLES:
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and MAX_TOKENS < body[key] <= 4096:
            body[key] = MAX_TOKENS
    if aim == "none":
        return
    if "model" in body:
        body["model"] = "scout"
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    # The schema cannot say "content is needed unless an assistant calls tools": fill it in.
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("content") is None:
            message["content"] = "Tell me about the herd."
    if aim == "stream":
        body["stream"] = True
        body["stream_options"] = {"include_usage": len(body) % 2 == 1}


def _fuzz(operation, mode: GenerationMode, tally: Tally, headers: dict[str, str]) -> None:
    examples = EXAMPLES.get(operation.path, DEFAULT_EXAMPLES)

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode), aim=st.sampled_from(["none", "none", "model", "stream"]))
    def run(case, aim):
        _aim_at_the_model(case, aim)
        tally.cases += 1
        try:
            response = case.call(headers=headers)
        except Exception as err:  # the in-process client re-raises what the app did not handle
            tally.fail(f"{operation.label} [{mode}] raised {type(err).__name__}: {err}; body {case.body!r}")
            return
        tally.codes[(operation.label, response.status_code)] += 1
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            tally.streams += 1
        for check in CHECKS:
            try:
                case.validate_response(response, checks=[check])
            except (Exception, BaseExceptionGroup) as err:
                tally.fail(f"{operation.label} [{mode}] {check.__name__} {response.status_code}: {str(err)[:800]}")

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, f"{operation.label}: no valid case could be generated"
        # An operation without parameters or body has no wrong inputs to make.


def _fuzz_all(schema, keep: Callable[[str], bool], headers: dict[str, str]) -> Tally:
    tally = Tally()
    for operation in _operations(schema, keep):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, tally, headers)
    return tally


def _report(tally: Tally) -> str:
    return "\n".join(tally.failures[:10]) + f"\n({len(tally.failures)} failures in {tally.cases} cases)"


def test_public_api_has_no_server_errors_and_matches_its_schema(schema, core):
    tally = _fuzz_all(schema, lambda path: not path.startswith("/admin/"), {})
    print(f"public API: {tally.cases} cases, {tally.streams} streams, codes {sorted(tally.codes.items())}")
    assert not tally.failures, _report(tally)
    assert tally.cases >= 1000 and tally.streams > 0
    for path in ("/v1/chat/completions", "/v1/completions"):
        codes = {code for (label, code), _ in tally.codes.items() if label.endswith(path)}
        assert {200, 400} <= codes, f"{path}: the fuzz never reached the model or never was refused ({codes})"
    assert settled(core), f"the replica still holds requests or KV blocks: {core.stats()}"


def test_admin_api_has_no_server_errors_and_matches_its_schema(ops_schema):
    tally = _fuzz_all(ops_schema, lambda path: path.startswith("/admin/"), {"authorization": f"Bearer {ADMIN_TOKEN}"})
    print(f"admin API: {tally.cases} cases, codes {sorted(tally.codes.items())}")
    assert not tally.failures, _report(tally)
    assert tally.cases >= 200
    codes = {code for _, code in tally.codes}
    assert {200, 201, 400, 404} <= codes, codes


def test_admin_api_without_its_credential_is_401_everywhere(ops_schema):
    tally = Tally()
    for operation in _operations(ops_schema, lambda path: path.startswith("/admin/")):
        _fuzz(operation, GenerationMode.POSITIVE, tally, {})
    print(f"admin API without the credential: {tally.cases} cases")
    assert not tally.failures, _report(tally)
    assert {code for _, code in tally.codes} == {401}, tally.codes


def test_admin_integers_past_int64_are_400_not_500(ops_schema):
    """Found by the fuzz: a limit past int64 reached SQLite and was a 500."""
    async def main():
        transport = httpx.ASGITransport(app=ops_schema.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://herd") as client:
            return await client.post("/admin/v1/tenants", json={"id": "huge", "max_output_tokens": 2**70},
                                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    assert asyncio.run(main()).status_code == 400


# --- what the fuzz relies on, pinned -----------------------------------------------------------------
def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd")


def test_the_document_says_400_not_422_and_documents_streams_and_413(schema, ops_schema):
    documents = (schema.app.openapi(), ops_schema.app.openapi())
    responses = {(path, method): op["responses"] for document in documents
                 for path, item in document["paths"].items() for method, op in item.items()}
    assert not [where for where, codes in responses.items() if "422" in codes]
    assert not [d for d in documents if "HTTPValidationError" in d["components"]["schemas"]]
    for path in ("/v1/chat/completions", "/v1/completions"):
        post = responses[(path, "post")]
        assert {"400", "401", "404", "413", "429"} <= set(post)
        assert set(post["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"409", "413"} <= set(responses[("/admin/v1/tenants", "post")])


def test_starlette_refusals_are_openai_shaped(schema):
    """Not UTF-8, no such route, wrong method: Starlette refuses them itself; the body is still OpenAI's."""
    async def main():
        async with _client(schema.app) as client:
            return (await client.post("/v1/completions", content=b'{"model": "\xff"}',
                                      headers={"content-type": "application/json"}),
                    await client.get("/v1/nothing-here"),
                    await client.delete("/v1/models"))

    bad_bytes, no_route, wrong_method = asyncio.run(main())
    for response, status in ((bad_bytes, 400), (no_route, 404), (wrong_method, 405)):
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
    assert "GET" in wrong_method.headers["allow"]


def _asgi_post(app, chunks: list[bytes], *, declared: int | None = None):
    """One POST /v1/completions straight through the ASGI app: (status, JSON body, chunks the app read)."""
    reads = 0

    async def receive():
        nonlocal reads
        if reads == len(chunks):
            return {"type": "http.disconnect"}
        reads += 1
        return {"type": "http.request", "body": chunks[reads - 1], "more_body": reads < len(chunks)}

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("herd", 80)}
    asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], json.loads(body), reads


LIMIT = 1024


@pytest.fixture
def small_app(gateway):
    return create_app(gateway, max_request_body_bytes=LIMIT)


def test_a_declared_body_over_the_limit_is_413_before_a_byte_is_read(small_app):
    status, body, reads = _asgi_post(small_app, [b" " * (LIMIT + 1)], declared=LIMIT + 1)
    assert status == 413 and reads == 0
    assert body["error"]["code"] == "request_too_large" and str(LIMIT) in body["error"]["message"]


def test_a_chunked_body_is_counted_and_refused_at_the_first_byte_past_the_limit(small_app):
    chunks = [b" " * 64] * 100  # 6400 bytes, no Content-Length
    status, body, reads = _asgi_post(small_app, chunks)
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert reads == LIMIT // 64 + 1, "read past the limit"


def test_a_body_at_the_limit_is_served_and_a_refusal_leaves_the_door_serving(small_app):
    request = json.dumps({"model": "scout", "prompt": "the herd", "max_tokens": 2, "temperature": 0}).encode()
    at_limit = request + b" " * (LIMIT - len(request))

    async def main():
        async with _client(small_app) as client:
            refused = await client.post("/v1/completions", content=at_limit + b" ",
                                        headers={"content-type": "application/json"})
            served = await client.post("/v1/completions", content=at_limit,
                                       headers={"content-type": "application/json"})
            return refused, served

    refused, served = asyncio.run(main())
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
    assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] == "length"
    status, _, _ = _asgi_post(small_app, [at_limit[:500], at_limit[500:]])
    assert status == 200


def test_the_limit_is_a_setting_with_the_doors_default():
    assert HerdSettings().max_request_body_bytes == MAX_REQUEST_BODY_BYTES == 16 * 2**20
    with pytest.raises(ValueError, match="max_request_body_bytes"):
        HerdSettings(max_request_body_bytes=0)
