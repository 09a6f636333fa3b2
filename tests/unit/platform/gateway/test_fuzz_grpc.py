"""hypothesis at the gRPC door (herd.v1.Inference): messages with random fields, corrupt bytes, and one
message over the size limit.

A call ends OK (a stream whose last chunk says why it finished, within the token budget) or with a
status that names the caller's mistake: INVALID_ARGUMENT (bytes that are not the message included),
NOT_FOUND, or RESOURCE_EXHAUSTED. Never UNKNOWN, never INTERNAL (a bug), never a hang; afterwards the
door still answers and the replica holds no request and no KV block.
"""

from __future__ import annotations

import asyncio
import collections
import threading

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.grpc_server import start_grpc
from herd.platform.settings import DoorLimits
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.platform.gateway.replica_state import settled

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
FUZZ = settings(max_examples=400, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
TIMEOUT_S = 30  # a call that outlives this is a hang, and fails the test
MAX_TOKENS = 4
MAX_MESSAGE_BYTES = DoorLimits().grpc_max_message_bytes


@pytest.fixture(scope="module")
def door(core):
    """The gRPC door on its own event loop thread, so hypothesis can drive it with a blocking client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)})
    server, port = asyncio.run_coroutine_threadsafe(start_grpc(gateway, port=0), loop).result(TIMEOUT_S)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    yield channel
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(TIMEOUT_S)
    loop.close()


# Each sampling field is absent, or in range, or (one field in a spoiled message) anything its type holds.
IN_RANGE = {
    "temperature": st.floats(0, 2, width=32), "top_p": st.floats(0.0625, 1, width=32),
    "min_p": st.floats(0, 1, width=32), "top_k": st.integers(0, 50),
    "max_tokens": st.integers(1, MAX_TOKENS),  # small budgets, so hundreds of calls stay quick
    "seed": st.integers(0, 2**64 - 1), "logprobs": st.integers(0, 20),
}
ANYTHING = {
    **dict.fromkeys(("temperature", "top_p", "min_p"), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    "top_k": INT32, "logprobs": INT32, "seed": st.integers(0, 2**64 - 1),
    "max_tokens": st.one_of(st.integers(-2, 0), INT32.filter(lambda n: n > 500)),  # refused before any work
}
MODELS = st.one_of(st.sampled_from(["", "Scout", "scout ", "nope"]), st.text(max_size=8))


@st.composite
def sampling_options(draw, spoil: bool):
    options = pb.SamplingOptions(ignore_eos=draw(st.booleans()))
    for name, values in IN_RANGE.items():
        if draw(st.booleans()):
            setattr(options, name, draw(values))
    options.stop.extend(draw(st.lists(st.text(min_size=1, max_size=4), max_size=3)))
    options.stop_token_ids.extend(draw(st.lists(st.integers(0, 300), max_size=2)))
    if spoil:
        name = draw(st.sampled_from([*ANYTHING, "stop", "stop_token_ids"]))
        if name == "stop":
            options.stop.extend(draw(st.lists(st.text(max_size=4), min_size=1, max_size=5)))
        elif name == "stop_token_ids":
            options.stop_token_ids.extend(draw(st.lists(INT32, min_size=1, max_size=3)))
        else:
            setattr(options, name, draw(ANYTHING[name]))
    return options


def _spoiled(draw) -> str | None:
    """Half the messages are well formed; the others have one part spoiled."""
    return draw(st.sampled_from([None, None, None, "model", "prompt", "sampling"]))


@st.composite
def generate_requests(draw):
    spoil = _spoiled(draw)
    request = pb.GenerateRequest(model=draw(MODELS) if spoil == "model" else "scout",
                                 sampling=draw(sampling_options(spoil == "sampling")),
                                 request_id=draw(st.text(max_size=8)),
                                 tenant=pb.TenantContext(tenant_id=draw(st.text(max_size=4)), weight=draw(FLOATS)),
                                 trace_context=draw(st.dictionaries(st.text(max_size=10), st.text(max_size=20),
                                                                    max_size=2)))
    if spoil == "prompt":
        prompt = draw(st.sampled_from(["empty text", "empty ids", "wild ids", "none"]))
        if prompt == "empty text":
            request.text = ""
        elif prompt == "empty ids":
            request.token_ids.SetInParent()
        elif prompt == "wild ids":
            request.token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(-5, 250_000), INT32), min_size=1,
                                                       max_size=12)))
    elif draw(st.booleans()):
        request.text = draw(st.text(min_size=1, max_size=40))
    else:
        request.token_ids.ids.extend(draw(st.lists(st.integers(0, 300), min_size=1, max_size=12)))
    return request


@st.composite
def chat_requests(draw):
    spoil = _spoiled(draw)
    roles = st.sampled_from(["user", "system", "assistant"])
    if spoil == "prompt":
        roles = st.sampled_from(["user", "tool", "ipython", "", "wizard"])
    parts = st.lists(st.builds(pb.ContentPart, text=st.text(max_size=10)), max_size=2)
    if spoil == "prompt":
        parts = st.lists(st.one_of(parts.map(lambda p: p[0] if p else pb.ContentPart()),
                                   st.builds(pb.ContentPart, image=st.binary(max_size=10))), max_size=2)
    messages = draw(st.lists(st.builds(pb.ChatMessage, role=roles, content=st.text(max_size=30), parts=parts),
                             min_size=0 if spoil == "prompt" else 1, max_size=3))
    sampling = draw(sampling_options(spoil == "sampling"))
    if not sampling.HasField("max_tokens"):
        sampling.max_tokens = MAX_TOKENS  # a chat's default budget is the whole context: keep the run short
    return pb.ChatRequest(model=draw(MODELS) if spoil == "model" else "scout", messages=messages, sampling=sampling)


def _metadata():
    """Trace context and credentials as a client may send them: well-formed or not."""
    value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
    return st.lists(st.tuples(st.sampled_from(["traceparent", "tracestate", "authorization"]), value), max_size=2)


def _still_serving(channel) -> None:
    stub = pb_grpc.InferenceStub(channel)
    good = pb.GenerateRequest(model="scout", text="the herd", sampling=pb.SamplingOptions(temperature=0, max_tokens=3))
    chunks = list(stub.Generate(good, timeout=TIMEOUT_S))
    assert chunks[-1].finish_reason and chunks[-1].usage.completion_tokens == 3
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S).models] == ["scout"]


def _call(call, request, metadata, codes):
    """One streaming call: its chunks, or None when it ended with an accepted refusal."""
    try:
        chunks = list(call(request, timeout=TIMEOUT_S, metadata=metadata))
    except grpc.RpcError as err:
        codes[err.code().name] += 1
        assert err.code() in REFUSALS, (err.code(), err.details(), request)
        assert err.details()
        return None
    codes["OK"] += 1
    return chunks


def test_random_generate_and_chat_messages_end_in_ok_or_a_named_refusal(door, core):
    stub = pb_grpc.InferenceStub(door)
    codes: collections.Counter[str] = collections.Counter()

    @FUZZ
    @given(request=st.one_of(generate_requests(), chat_requests()), metadata=_metadata())
    def run(request, metadata):
        is_chat = isinstance(request, pb.ChatRequest)
        chunks = _call(stub.Chat if is_chat else stub.Generate, request, metadata, codes)
        if chunks is None:
            return
        budget = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        assert chunks and chunks[-1].finish_reason in ("stop", "length"), chunks[-1:]
        assert all(not c.finish_reason for c in chunks[:-1])
        assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks) <= budget
        assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id != request.request_id

    run()
    print(f"Inference fuzz: {dict(codes)}")
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0 and codes["NOT_FOUND"] > 0, codes
    assert settled(core), f"the replica still holds requests or KV blocks: {core.stats()}"
    _still_serving(door)


METHODS = ("Generate", "Chat", "ListModels")


def test_corrupt_bytes_are_refused_and_the_door_serves_on(door, core):
    streams = {name: door.unary_stream(f"/herd.v1.Inference/{name}", request_serializer=None,
                                       response_deserializer=None) for name in ("Generate", "Chat")}
    list_models = door.unary_unary("/herd.v1.Inference/ListModels", request_serializer=None,
                                   response_deserializer=None)
    raw = {**streams, "ListModels": lambda data, timeout: [list_models(data, timeout=timeout)]}
    valid = {"Generate": pb.GenerateRequest(model="scout", text="the herd", sampling=pb.SamplingOptions(
                 max_tokens=MAX_TOKENS)).SerializeToString(),
             "Chat": pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content="hi")],
                                    sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS)).SerializeToString(),
             "ListModels": b"\x78\x01"}  # an unknown field 15: skipped
    codes: collections.Counter[str] = collections.Counter()

    def flipped(method, at, byte):
        data = valid[method]
        return data[:at % len(data)] + bytes([byte]) + data[at % len(data) + 1:]

    @st.composite
    def corrupt(draw):
        method = draw(st.sampled_from(METHODS))
        kind = draw(st.sampled_from(["random", "flipped", "cut"]))
        if kind == "random":
            return method, draw(st.binary(max_size=200))
        if kind == "flipped":
            return method, flipped(method, draw(st.integers(0, 10**6)), draw(st.integers(0, 255)))
        return method, valid[method][:draw(st.integers(0, len(valid[method]) - 1))]

    @FUZZ
    @given(corrupt())
    def run(case):
        method, data = case
        try:
            list(raw[method](data, timeout=TIMEOUT_S))
        except grpc.RpcError as err:
            if err.code() in REFUSALS:
                codes[err.code().name] += 1
                return
            raise AssertionError(f"{err.code()}: {err.details()}") from err
        codes["OK"] += 1

    run()
    models = pb.ListModelsResponse.FromString(list_models(valid["ListModels"], timeout=TIMEOUT_S))
    assert [m.id for m in models.models] == ["scout"]
    print(f"corrupt Inference bytes: {dict(codes)}")
    assert codes["INVALID_ARGUMENT"] > 0, codes
    assert settled(core), f"the replica still holds requests or KV blocks: {core.stats()}"
    _still_serving(door)


def test_a_message_over_the_limit_is_resource_exhausted_and_the_door_serves_on(door, core):
    stub = pb_grpc.InferenceStub(door)
    over = pb.GenerateRequest(model="scout", text="x" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(over, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    # Past gRPC's 4 MiB default, under the door's limit: it reaches the gateway, which refuses it by context.
    ids = pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=[7] * (5 * 2**20)))
    assert ids.ByteSize() > 4 * 2**20
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(ids, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in info.value.details()
    assert settled(core)
    _still_serving(door)
