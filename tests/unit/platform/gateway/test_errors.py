"""What a refusal tells the caller: our own failures without their detail (logged under the request id),
a refusal of the request with its message; and credentials no key can be (issue 17, items 1 and 13)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import grpc
import httpx
import pytest

from herd.engine.errors import Code, HerdError
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import (
    bearer_credential,
    from_replica,
    from_status,
    http_status,
    internal,
    metadata_credential,
    openai_body,
    replica_unavailable,
)
from herd.platform.gateway.grpc_server import InferenceService, start_grpc
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.platform.gateway import test_tenancy

world = test_tenancy.world  # a gateway with tenancy over SQLite: (store, ledger, gateway, {tenant: key})

SHARD = "10.0.0.7:50061"


def _logged(caplog) -> list[tuple[str, str]]:
    return [(record.getMessage(), getattr(record, "request_id", "")) for record in caplog.records]


def test_internal_logs_the_detail_and_answers_only_the_request_id(caplog):
    caplog.set_level(logging.ERROR)
    err = internal(f"RuntimeError: {SHARD} is down", request_id="herd-1234")
    assert err.code is Code.INTERNAL and err.message == "internal error; request id herd-1234"
    assert SHARD not in json.dumps(openai_body(err)) and http_status(err) == 500
    assert (f"INTERNAL: RuntimeError: {SHARD} is down", "herd-1234") in _logged(caplog)
    fresh = internal("boom")  # outside a request: a new id, the same in the answer and the log
    request_id = fresh.message.rsplit(" ", 1)[1]
    assert request_id.startswith("herd-") and ("INTERNAL: boom", request_id) in _logged(caplog)


@pytest.mark.parametrize("code", [Code.INTERNAL, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
def test_a_replicas_own_failures_are_answered_without_their_text(code, caplog):
    caplog.set_level(logging.WARNING)
    replica = HerdError(code, f"expert shard at {SHARD}: Connection refused")
    answers = [from_replica(replica, request_id="herd-r1"), from_status(code.value, replica.message,
                                                                        request_id="herd-r1")]
    for err in answers:
        assert err.code is code and SHARD not in err.message and err.message.endswith("request id herd-r1")
    assert all(err.retry_after_s == 1 for err in answers) if code is Code.UNAVAILABLE else True
    assert sum(SHARD in message and rid == "herd-r1" for message, rid in _logged(caplog)) == 2


def test_ray_failures_are_unavailable_without_their_text(caplog):
    caplog.set_level(logging.WARNING)
    err = replica_unavailable(f"ActorDiedError: the actor died on node {SHARD}", request_id="herd-r2")
    assert err.code is Code.UNAVAILABLE and err.retry_after_s == 1 and SHARD not in err.message
    assert any(SHARD in message for message, _ in _logged(caplog))


def test_refusals_of_the_request_keep_their_message():
    refused = from_replica(HerdError(Code.INVALID_ARGUMENT, "image 0: not an image", param="messages"))
    assert (refused.code, refused.message, refused.param) == (Code.INVALID_ARGUMENT, "image 0: not an image",
                                                              "messages")
    busy = from_status("RESOURCE_EXHAUSTED", f"queue of {SHARD} full")
    assert busy.code is Code.RESOURCE_EXHAUSTED and SHARD not in busy.message and busy.retry_after_s == 1


@pytest.mark.parametrize("header", ["Bearer é", "Bearer hk_éééééééé_" + "x" * 32, "Bearer \u2603", "bearer ab\x01cd",
                                    "Bearer ab\x7fcd"])
def test_a_value_that_is_not_printable_ascii_is_no_credential(header):
    assert bearer_credential(header) is None
    assert metadata_credential(header) is None and metadata_credential(header.split(" ", 1)[1]) is None


def test_credentials_are_read_from_the_scheme_or_the_bare_metadata():
    assert bearer_credential("Bearer hk_a_b ") == "hk_a_b" and bearer_credential("bearer  tok") == "tok"
    assert bearer_credential(None) is bearer_credential("Basic abc") is bearer_credential("Bearer ") is None
    assert metadata_credential("Bearer hk_a_b") == metadata_credential(" hk_a_b ") == "hk_a_b"
    assert metadata_credential("") is metadata_credential(None) is None


# --- at the doors -------------------------------------------------------------------------------------------
class Failing(LocalBackend):
    """The replica in this process, failing with a shard's address after `after` chunks."""

    def __init__(self, core, after: int) -> None:
        super().__init__(core)
        self.after = after

    async def generate(self, request):
        async with contextlib.aclosing(super().generate(request)) as chunks:
            sent = 0
            async for chunk in chunks:
                if sent == self.after:
                    break
                sent += 1
                yield chunk
        raise RuntimeError(f"{SHARD} is down")


@pytest.mark.parametrize("after", [0, 2])
def test_a_failing_backend_is_internal_with_a_request_id_at_the_grpc_door(core, after, caplog):
    caplog.set_level(logging.ERROR)
    gateway = Gateway({"scout": Failing(core, after)})
    request = pb.GenerateRequest(model="scout", text="the herd",
                                 sampling=pb.SamplingOptions(temperature=0, max_tokens=8, ignore_eos=True))

    async def main():
        server, port = await start_grpc(gateway, port=0)
        chunks = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for chunk in pb_grpc.InferenceStub(channel).Generate(request):
                        chunks.append(chunk)
        finally:
            await server.stop(0)
        return chunks, info.value

    chunks, error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INTERNAL and SHARD not in error.details()
    request_id = error.details().rsplit(" ", 1)[1]
    assert error.details() == f"internal error; request id {request_id}"
    assert len(chunks) == after and all(c.request_id == request_id for c in chunks)
    assert (f"INTERNAL: RuntimeError: {SHARD} is down", request_id) in _logged(caplog)


def test_a_stream_failing_midway_ends_with_an_error_event_without_its_text_at_the_http_door(core, caplog):
    caplog.set_level(logging.ERROR)
    app = create_app(Gateway({"scout": Failing(core, after=2)}))
    body = {"model": "scout", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True,
            "stream": True}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd") as client:
            return await client.post("/v1/chat/completions", json=body)

    reply = asyncio.run(main())
    assert reply.status_code == 200 and SHARD not in reply.text
    events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
              if line.startswith("data: {")]
    error = events[-1]["error"]
    assert error["type"] == "server_error" and error["message"].startswith("internal error; request id herd-")
    request_id = error["message"].rsplit(" ", 1)[1]
    assert any(SHARD in message and rid == request_id for message, rid in _logged(caplog))


def test_a_non_ascii_key_is_401_at_both_doors(world):
    _, _, gateway, _ = world
    values = ["Bearer é", "Bearer hk_éééééééé_" + "x" * 32, "Bearer \u2603"]

    async def main():
        async with test_tenancy._http(gateway) as client:
            http = [await client.post("/v1/chat/completions", json=test_tenancy._chat(),
                                      headers=[(b"authorization", value.encode())]) for value in values]
        # gRPC's own clients refuse to send such metadata; the door is asked directly with it.
        service = InferenceService(gateway)
        grpc_codes = []
        for value in values:
            context = _Context(value)
            with contextlib.suppress(_Aborted):
                await service.ListModels(pb.ListModelsRequest().SerializeToString(), context)
            grpc_codes.append(context.code)
        return http, grpc_codes

    http, grpc_codes = asyncio.run(main())
    assert [r.status_code for r in http] == [401] * len(values)
    assert all(r.json()["error"]["type"] == "authentication_error" for r in http)
    assert grpc_codes == [grpc.StatusCode.UNAUTHENTICATED] * len(values)


class _Aborted(Exception):
    pass


class _Context:
    """A call's context as the door reads it: its metadata, and where it aborts."""

    def __init__(self, authorization: str) -> None:
        self.metadata = (("authorization", authorization),)
        self.code = None

    def invocation_metadata(self):
        return self.metadata

    async def abort(self, code, details):
        self.code = code
        raise _Aborted(details)
