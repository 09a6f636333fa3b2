"""The gRPC door over an in-process replica: streams, health, reflection, errors, deadlines, cancels."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from herd.platform.gateway.grpc_server import start_grpc
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.waiting import until

GREEDY = pb.SamplingOptions(temperature=0, max_tokens=10)


def _with_server(gateway, body):
    async def main():
        server, port = await start_grpc(gateway, port=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await body(channel)
        finally:
            await server.stop(0)

    return asyncio.run(main())


def test_list_generate_chat_health_and_reflection(gateway):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        models = await stub.ListModels(pb.ListModelsRequest())
        chunks = [c async for c in stub.Generate(pb.GenerateRequest(model="scout", text="the herd", sampling=GREEDY))]
        chat = [c async for c in stub.Chat(pb.ChatRequest(
            model="scout", messages=[pb.ChatMessage(role="user", content="hi")], sampling=GREEDY))]
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="herd.v1.Inference"))
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        answers = [a async for a in reflect.ServerReflectionInfo(asks)]
        return models, chunks, chat, status, answers

    models, chunks, chat, status, answers = _with_server(gateway, body)
    assert [m.id for m in models.models] == ["scout"]
    for stream in (chunks, chat):
        assert stream[-1].finish_reason in ("length", "stop")
        assert stream[-1].usage.completion_tokens == sum(len(c.token_ids) for c in stream)
        assert all(not c.finish_reason for c in stream[:-1])
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    services = {s.name for s in answers[0].list_services_response.service}
    assert {"herd.v1.Inference", "grpc.health.v1.Health"} <= services


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.GenerateRequest(model="scout", text=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(model="scout"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(model="nope", text="x"), grpc.StatusCode.NOT_FOUND),
        (pb.GenerateRequest(model="scout", text="x", sampling=pb.SamplingOptions(max_tokens=10**6)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(model="scout", text="x", sampling=pb.SamplingOptions(top_p=3.0)),
         grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_are_status_codes_with_messages(gateway, request_, code):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request_):
                pass
        ok = [c async for c in stub.Generate(pb.GenerateRequest(model="scout", text="x", sampling=GREEDY))]
        return info.value, ok

    error, ok = _with_server(gateway, body)
    assert error.code() == code and error.details()
    assert ok[-1].finish_reason


def test_chat_and_context_errors_are_invalid_argument_and_serving_goes_on(gateway, core):
    limit = core.max_model_len
    too_long = pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=[5] * limit), sampling=GREEDY)
    calls = [
        lambda stub: stub.Generate(too_long),
        lambda stub: stub.Chat(pb.ChatRequest(model="scout", messages=[], sampling=GREEDY)),
        lambda stub: stub.Chat(pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="wizard", content="x")])),
        lambda stub: stub.Chat(pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content="x")],
                                              sampling=pb.SamplingOptions(max_tokens=limit + 1))),
    ]

    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        errors = []
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call(stub):
                    pass
            errors.append(info.value)
        ok = [c async for c in stub.Chat(pb.ChatRequest(
            model="scout", messages=[pb.ChatMessage(role="user", content="hi")], sampling=GREEDY))]
        return errors, ok

    errors, ok = _with_server(gateway, body)
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * len(calls)
    assert str(limit) in errors[0].details() and "messages" in errors[1].details()
    assert all(e.details() for e in errors)
    assert ok[-1].finish_reason and _blocks_in_use(core) == 0


def _blocks_in_use(core):
    return core.stats()["kv_blocks_held"]


def test_deadline_and_cancel_both_free_the_kv_blocks(gateway, core):
    long = pb.GenerateRequest(model="scout", text="the herd " * 20,
                              sampling=pb.SamplingOptions(temperature=0, max_tokens=400, ignore_eos=True))

    async def settle():
        return await until(lambda: core.stats()["in_flight"] == 0 and _blocks_in_use(core) == 0, timeout_s=4)

    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(long, timeout=0.5):
                pass
        after_deadline = await settle()
        call = stub.Generate(long)
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                assert _blocks_in_use(core) > 0
                call.cancel()
                break
        after_cancel = await settle()
        return info.value.code(), after_deadline, after_cancel

    code, after_deadline, after_cancel = _with_server(gateway, body)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after_deadline, "blocks still held after the deadline"
    assert after_cancel, "blocks still held after the client cancelled"
