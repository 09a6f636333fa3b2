"""schemathesis on POST /v1/messages aimed at the served model (the door-wide fuzz, test_fuzz_http, mostly names
models that do not exist): bodies that fit the schema and bodies that break it, whole and streamed, must get no
5xx, a documented status and a body (or every event of a stream) that matches the documented schema."""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from tests.unit.platform.gateway.replica_state import settled
from tests.unit.platform.gateway.test_fuzz_http import CHECKS


@pytest.fixture(scope="module")
def messages_operation(core):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(
        Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)})))
    [operation] = [r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/messages"]
    return operation


def _aim(body: object, stream: bool) -> None:
    if not isinstance(body, dict):
        return
    body["model"] = "scout"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 4:
        body["max_tokens"] = 4
    body["stream"] = stream


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_messages_fuzz_reaches_the_model_without_server_errors(messages_operation, core, mode):
    codes: collections.Counter[int] = collections.Counter()
    failures: list[str] = []

    @settings(max_examples=120, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=messages_operation.as_strategy(mode), stream=st.booleans())
    def run(case, stream):
        _aim(case.body, stream)
        response = case.call()
        codes[response.status_code] += 1
        for check in CHECKS:
            try:
                case.validate_response(response, checks=[check])
            except (Exception, BaseExceptionGroup) as err:
                failures.append(f"{check.__name__} {response.status_code}: {str(err)[:600]}; body {case.body!r:.400}")

    run()
    print(f"/v1/messages [{mode}]: codes {sorted(codes.items())}")
    assert not failures, "\n".join(failures[:5]) + f"\n({len(failures)} failures)"
    assert 400 in codes
    if mode == GenerationMode.POSITIVE:
        assert 200 in codes, codes
    assert settled(core), f"the replica still holds requests or KV blocks: {core.stats()}"
