"""How a replica turns a request's engine outputs into stream messages (herd.workers.replica_core.merged_chunks
and the interval policy), with made-up outputs and a fake clock: no model, no engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from herd.engine.errors import Code, HerdError
from herd.engine.outputs import RequestOutput
from herd.engine.sampler import TokenLogprobs
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_core import MESSAGE_SPACING_S, merged_chunks, stream_interval_s


def outputs(steps: list[list[int]], *, logprobs: bool = False, finish: str = "length") -> list[RequestOutput]:
    """The outputs of a request whose step i makes the tokens steps[i] (text: 't<id>' each); the last finishes."""
    made: list[RequestOutput] = []
    got: list[int] = []
    for i, new in enumerate(steps):
        got = got + new
        last = i == len(steps) - 1
        lps = ([TokenLogprobs(token_id=t, logprob=-0.5, top=((t, -0.5), (t + 1, -1.5))) for t in got]
               if logprobs else None)
        made.append(RequestOutput(request_id="r", tenant_id="default", prompt_token_ids=[1, 2, 3],
                                  token_ids=list(got), text="".join(f"t{t}" for t in got), delta_token_ids=list(new),
                                  delta_text="".join(f"t{t}" for t in new), finished=last,
                                  finish_reason=finish if last else None, logprobs=lps, num_cached_tokens=2))
    return made


async def feed(items: list[RequestOutput], times: list[float], now: list[float]) -> AsyncIterator[RequestOutput]:
    """Each output at its time on the fake clock `now`."""
    for out, t in zip(items, times, strict=True):
        now[0] = t
        yield out


def collect(items: list[RequestOutput], times: list[float], interval_s: float, **kw: object) -> list[pb.GenerateChunk]:
    now = [0.0]

    async def run() -> list[pb.GenerateChunk]:
        return [c async for c in merged_chunks(feed(items, times, now), lambda: interval_s, lambda t: f"p{t}",
                                               clock=lambda: now[0], **kw)]  # type: ignore[arg-type]

    return asyncio.run(run())


def test_first_message_at_once_then_one_per_interval_and_the_last_at_once() -> None:
    steps = [[10], [11], [12], [13, 14], [15], [16]]
    chunks = collect(outputs(steps), [0.0, 0.02, 0.04, 0.06, 0.13, 0.14], interval_s=0.05)
    # 0.00 first; 0.02 and 0.04 wait; 0.06 is 60 ms after the first: sent; 0.13 too (70 ms); 0.14 finishes
    assert [list(c.token_ids) for c in chunks] == [[10], [11, 12, 13, 14], [15], [16]]
    assert [c.text for c in chunks] == ["t10", "t11t12t13t14", "t15", "t16"]
    assert [c.finish_reason for c in chunks] == ["", "", "", "length"]
    assert not any(c.HasField("usage") for c in chunks[:-1])
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (3, 7, 2)
    assert all(c.request_id == "r" for c in chunks)


def test_every_step_with_interval_zero_and_one_message_when_all_waits() -> None:
    steps = [[1], [2], [3]]
    assert len(collect(outputs(steps), [0.0, 0.0, 0.0], interval_s=0.0)) == 3
    merged = collect(outputs(steps), [0.0, 0.01, 0.02], interval_s=10.0)
    assert [list(c.token_ids) for c in merged] == [[1], [2, 3]]


def test_logprobs_of_exactly_the_tokens_a_message_carries_spelled_by_piece() -> None:
    chunks = collect(outputs([[5], [6], [7, 8]], logprobs=True), [0.0, 0.01, 0.02], interval_s=1.0)
    assert [[lp.token_id for lp in c.logprobs] for c in chunks] == [[5], [6, 7, 8]]
    first = chunks[1].logprobs[0]
    assert (first.token, first.logprob) == ("p6", -0.5)
    assert [(t.token_id, t.token, t.logprob) for t in first.top] == [(6, "p6", -0.5), (7, "p7", -1.5)]


def test_check_sees_every_output_and_its_error_ends_the_stream() -> None:
    seen: list[int] = []

    def check(out: RequestOutput) -> None:
        seen.extend(out.delta_token_ids)
        if 3 in out.delta_token_ids:
            raise HerdError(Code.INTERNAL, "the engine step failed")

    with pytest.raises(HerdError, match="engine step failed"):
        collect(outputs([[1], [2], [3], [4]]), [0.0, 0.01, 0.02, 0.03], interval_s=1.0, check=check)
    assert seen == [1, 2, 3]


def test_interval_grows_with_the_streams_in_flight_so_the_replica_sends_a_bounded_rate() -> None:
    assert stream_interval_s(0.05, 1) == 0.05
    assert stream_interval_s(0.05, 8) == max(0.05, 8 * MESSAGE_SPACING_S)
    assert stream_interval_s(0.05, 32) == pytest.approx(32 * MESSAGE_SPACING_S)
    assert 32 / stream_interval_s(0.05, 32) == pytest.approx(1 / MESSAGE_SPACING_S)  # messages per second, all
    assert stream_interval_s(0.0, 32) == 0.0  # 0 keeps meaning every step


def test_echo_and_prompt_logprobs_go_in_the_first_message_only() -> None:
    made = outputs([[10], [11], [12]])
    scored = [None, TokenLogprobs(token_id=2, logprob=-1.0, top=((9, -0.5),)),
              TokenLogprobs(token_id=3, logprob=-2.0, top=((3, -2.0),))]
    made = [dataclasses.replace(out, prompt_logprobs=scored) for out in made]  # on every output from the first
    chunks = collect(made, [0.0, 0.1, 0.2], interval_s=0.05, echo="the prompt")
    assert [c.text for c in chunks] == ["the promptt10", "t11", "t12"]
    assert [list(c.token_ids) for c in chunks] == [[10], [11], [12]]  # the generated tokens only
    first = chunks[0].prompt_logprobs
    assert [(e.token_id, e.token, e.logprob, [(t.token_id, t.logprob) for t in e.top]) for e in first] == [
        (1, "p1", 0.0, []), (2, "p2", -1.0, [(9, -0.5)]), (3, "p3", -2.0, [(3, -2.0)])]
    assert not any(c.prompt_logprobs for c in chunks[1:])
    assert chunks[-1].usage.completion_tokens == 3


def test_choices_are_merged_apart_and_each_ends_with_its_own_usage() -> None:
    zero = outputs([[10], [11], [12]])
    one = [dataclasses.replace(out, index=1) for out in outputs([[20], [21, 22]])]
    items = [zero[0], one[0], zero[1], one[1], zero[2]]  # interleaved, as the engine's steps make them
    chunks = collect(items, [0.0, 0.0, 0.02, 0.03, 0.04], interval_s=0.05)
    assert [(c.index, list(c.token_ids)) for c in chunks] == [(0, [10]), (1, [20]), (1, [21, 22]), (0, [11, 12])]
    ends = {c.index: c for c in chunks if c.finish_reason}
    assert (ends[0].usage.completion_tokens, ends[1].usage.completion_tokens) == (3, 3)
    assert ends[0].usage.prompt_tokens == ends[1].usage.prompt_tokens == 3
