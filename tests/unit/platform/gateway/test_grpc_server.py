"""The gRPC door over an in-process replica: streams, health, reflection, errors, deadlines, cancels."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from herd.platform.gateway.grpc_server import start_grpc
from herd.platform.settings import DoorLimits
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.platform.gateway import test_tenancy
from tests.waiting import until

world = test_tenancy.world  # a gateway with tenancy over SQLite: (store, ledger, gateway, {tenant: key})

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


# --- what a caller may hold before and after its key is checked (issue 17, items 9 and 10) ------------------
def _serving(gateway, body, limits=None, options=()):
    """`body(stub, channel)` against a door with `limits`, over a channel with `options`."""
    async def main():
        server, port = await start_grpc(gateway, port=0, limits=limits)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(options)) as channel:
                return await body(pb_grpc.InferenceStub(channel), channel)
        finally:
            await server.stop(0)

    return asyncio.run(main())


async def _code(call):
    """The status a streaming call ended with (OK when it streamed to its end)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, None


def test_a_bad_key_is_refused_before_its_message_is_parsed(world, monkeypatch):
    _, _, gateway, keys = world
    parsed = []
    for message in (pb.GenerateRequest, pb.ChatRequest, pb.ListModelsRequest):
        spy = staticmethod(lambda data, real=message.FromString: parsed.append(data) or real(data))
        monkeypatch.setattr(message, "FromString", spy)
    big = pb.GenerateRequest(model="scout", text="x" * (6 * 2**20), sampling=pb.SamplingOptions(max_tokens=2))
    chat = pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content="y" * (3 * 2**20))])
    bad = (("authorization", "Bearer hk_abcdefgh_" + "x" * 32),)

    async def body(stub, _):
        refused = [await _code(stub.Generate(big, metadata=bad)), await _code(stub.Chat(chat, metadata=bad)),
                   await _code(stub.Generate(big)), await _code(stub.Chat(chat))]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListModels(pb.ListModelsRequest(), metadata=bad)
        refused.append((info.value.code(), info.value.details()))
        good = (("authorization", f"Bearer {keys['b']}"),)
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=good)
        return refused, models

    refused, models = _serving(gateway, body)
    assert [code for code, _ in refused] == [grpc.StatusCode.UNAUTHENTICATED] * 5, refused
    assert len(parsed) == 1 and sorted(m.id for m in models.models) == ["other", "scout"], "only the good call parsed"


def test_a_message_over_the_door_limit_is_resource_exhausted_unread(gateway, monkeypatch):
    parsed = []
    real = pb.GenerateRequest.FromString
    monkeypatch.setattr(pb.GenerateRequest, "FromString", staticmethod(lambda data: parsed.append(data) or real(data)))
    limits = DoorLimits(grpc_max_message_bytes=2**20)
    over = pb.GenerateRequest(model="scout", text="x" * (2**20 + 1))

    async def body(stub, _):
        return await _code(stub.Generate(over)), await _code(stub.Generate(pb.GenerateRequest(
            model="scout", text="the herd", sampling=GREEDY)))

    over_limit, ok = _serving(gateway, body, limits)
    assert over_limit[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, over_limit
    assert ok[0] == grpc.StatusCode.OK and len(parsed) == 1


def test_calls_past_the_stream_limit_wait_for_a_free_stream(gateway, monkeypatch):
    """With one stream per connection, a second call on the channel reaches the door only once the first ends."""
    events = []
    identify = gateway.identify

    async def spy(credential):
        events.append("call arrives")
        return await identify(credential)

    monkeypatch.setattr(gateway, "identify", spy)
    long = pb.GenerateRequest(model="scout", text="the herd",
                              sampling=pb.SamplingOptions(temperature=0, max_tokens=400, ignore_eos=True))

    async def body(stub, _):
        first = stub.Generate(long)
        await first.read()
        second = asyncio.create_task(_code(stub.Generate(pb.GenerateRequest(model="scout", text="x", sampling=GREEDY))))
        for _ in range(40):  # the second call is sent while the first streams on
            await first.read()
        events.append("first ends")
        first.cancel()
        return await second

    second = _serving(gateway, body, DoorLimits(grpc_max_concurrent_streams=1))
    assert second[0] == grpc.StatusCode.OK
    assert events == ["call arrives", "first ends", "call arrives"]


def test_a_client_pinging_too_often_is_disconnected(gateway):
    pinging = [("grpc.keepalive_time_ms", 50), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]

    async def body(stub, channel):
        await stub.ListModels(pb.ListModelsRequest())
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 30)
        return channel.get_state()

    assert _serving(gateway, body, DoorLimits(grpc_min_ping_interval_s=5), pinging) != grpc.ChannelConnectivity.READY


def test_a_stream_its_client_stops_reading_is_aborted_and_settled(world):
    store, ledger, gateway, keys = world
    # Small flow-control windows: the door's writes block as soon as the client stops reading.
    stalled = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    long = pb.GenerateRequest(model="scout", text="the herd",
                              sampling=pb.SamplingOptions(max_tokens=480, ignore_eos=True, logprobs=20))
    metadata = (("authorization", f"Bearer {keys['b']}"),)

    async def body(stub, _):
        ledger.start()
        call = stub.Generate(long, metadata=metadata)
        first = await call.read()
        aborted = await until(lambda: gateway.in_flight == 0, timeout_s=30)
        ended = await _code(call)
        await ledger.close()
        return first, aborted, ended

    first, aborted, ended = _serving(gateway, body, DoorLimits(stream_write_timeout_s=1), stalled)
    assert aborted, "the stalled stream still holds its slot"
    assert ended[0] == grpc.StatusCode.DEADLINE_EXCEEDED and "read nothing" in ended[1], ended
    [row] = store.usage_rows("b")
    assert row.request_id == first.request_id and row.status == "cancelled"
    assert 0 < row.completion_tokens < 480, "billed for what was streamed, not the whole budget"
