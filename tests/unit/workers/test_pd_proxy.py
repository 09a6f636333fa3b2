"""The disaggregated model's ingress with fake pools (no Ray): a request prefilled then streamed from decode, one
with images sent to decode alone, a failed prefill falling back to decode alone (counted), a decode error passed on
as a plain HerdError; and the settings a disaggregated model cannot start with refused before anything deploys."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from herd.engine.errors import Code, HerdError
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.kv_transport import Prefilled
from herd.workers.pd_proxy import PDProxy
from herd.workers.serve_app import build_app

PREFILLED = Prefilled(handle="h", blocks=3, nbytes=300, cached_tokens=16)


class _Call:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakePool:
    """What PDProxy calls on a DeploymentHandle: method.remote(...) awaitable, or a stream with options(stream=True)."""

    def __init__(self, *, fail: Exception | None = None, decode_error: Exception | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.streams: list[Any] = []
        self.fail, self.decode_error = fail, decode_error
        self.prefill = _Call(self._prefill)
        self.generate_with_kv = _Call(self._generate_with_kv)
        self.stats = _Call(self._stats)

    def options(self, **_: Any) -> FakePool:
        return self

    async def _prefill(self, request: bytes) -> Prefilled:
        self.calls.append(("prefill", request))
        if self.fail is not None:
            raise self.fail
        return PREFILLED

    def _generate_with_kv(self, request: bytes, prefilled: Prefilled | None) -> Any:
        self.calls.append(("generate_with_kv", prefilled))
        error = self.decode_error

        class Stream:
            cancelled = False

            def __aiter__(self) -> Any:
                return self.chunks()

            async def chunks(self) -> Any:
                yield pb.GenerateChunk(text="a", token_ids=[1]).SerializeToString()
                if error is not None:
                    raise error
                yield pb.GenerateChunk(text="b", token_ids=[2], finish_reason="length").SerializeToString()

            def cancel(self) -> None:
                Stream.cancelled = True

        self.streams.append(Stream())
        return self.streams[-1]

    async def _stats(self) -> dict[str, int]:
        return {"kv_blocks_held": 0, "kv_imports": 1}


def _request(**extra: Any) -> bytes:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), **extra).SerializeToString()


def _run(proxy: Any, request: bytes) -> list[pb.GenerateChunk]:
    async def main() -> list[pb.GenerateChunk]:
        return [pb.GenerateChunk.FromString(data) async for data in proxy.generate(request)]

    return asyncio.run(main())


def _proxy(prefill: FakePool, decode: FakePool) -> Any:
    return PDProxy.func_or_class(prefill, decode, "scout")  # type: ignore[attr-defined]


def test_prefill_then_decode_and_the_counts():
    prefill, decode = FakePool(), FakePool()
    proxy = _proxy(prefill, decode)
    assert [c.token_ids[0] for c in _run(proxy, _request())] == [1, 2]
    assert prefill.calls == [("prefill", _request())] and decode.calls == [("generate_with_kv", PREFILLED)]
    assert not decode.streams[0].cancelled, "a stream read to its end is not cancelled"
    assert [c.token_ids[0] for c in _run(proxy, _request(images=[b"png"]))] == [1, 2]
    assert decode.calls[-1] == ("generate_with_kv", None) and len(prefill.calls) == 1, "images: decode alone"
    stats = asyncio.run(proxy.stats())
    assert stats["kv_imports"] == 1 and stats["prefill_kv_blocks_held"] == 0
    assert {k: stats[k] for k in ("pd_requests", "pd_prefilled", "pd_colocated", "pd_fallbacks", "pd_blocks_moved",
                                  "pd_bytes_moved")} == {"pd_requests": 2, "pd_prefilled": 1, "pd_colocated": 1,
                                                         "pd_fallbacks": 0, "pd_blocks_moved": 3,
                                                         "pd_bytes_moved": 300}


def test_a_failed_prefill_falls_back_to_decode_alone():
    decode = FakePool()
    proxy = _proxy(FakePool(fail=RuntimeError("prefill replica gone")), decode)
    assert [c.token_ids[0] for c in _run(proxy, _request())] == [1, 2]
    assert decode.calls == [("generate_with_kv", None)] and proxy.counts["pd_fallbacks"] == 1


def test_a_decode_error_comes_out_plain_and_the_stream_is_cancelled():
    class RemoteError(HerdError):  # what Ray raises: its own subclass of the replica's error
        pass

    decode = FakePool(decode_error=RemoteError(Code.INVALID_ARGUMENT, "bad", param="max_tokens"))
    proxy = _proxy(FakePool(), decode)
    with pytest.raises(HerdError) as caught:
        _run(proxy, _request())
    assert type(caught.value) is HerdError and caught.value.code is Code.INVALID_ARGUMENT
    assert caught.value.param == "max_tokens" and decode.streams[0].cancelled


@pytest.mark.parametrize(("args", "message"), [
    ({"disaggregation": {}, "engine": {"enable_prefix_caching": False}}, "enable_prefix_caching"),
    ({"disaggregation": {}, "deployment": {"autoscaling": {"max_replicas": 2}}}, "only the proxy"),
    ({"disaggregation": {"decode_replicas": 0}}, "decode_replicas"),
])
def test_what_a_disaggregated_model_cannot_start_with(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_app(args)


def test_a_disaggregated_app_builds() -> None:
    build_app({"disaggregation": {"prefill_replicas": 2}, "shards": 0})


def test_grpcs_generate_streams_messages_and_keeps_a_refusals_code():
    class Context:
        code, details = None, None

        def set_code(self, code: Any) -> None:
            Context.code = code

        def set_details(self, details: str) -> None:
            Context.details = details

    async def run(proxy: Any) -> list[pb.GenerateChunk]:
        request = pb.GenerateRequest.FromString(_request())
        return [chunk async for chunk in proxy.Generate(request, Context())]

    assert [c.token_ids[0] for c in asyncio.run(run(_proxy(FakePool(), FakePool())))] == [1, 2]
    refusing = FakePool(decode_error=HerdError(Code.INVALID_ARGUMENT, "too long"))
    with pytest.raises(HerdError, match="too long"):
        asyncio.run(run(_proxy(FakePool(), refusing)))
    assert Context.code.name == "INVALID_ARGUMENT" and Context.details == "too long"
