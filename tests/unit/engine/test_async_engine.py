"""The asyncio API: tokens stream as they are made, and an abort (or a client leaving) frees the blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from herd.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from herd.model.tiny import make_tiny
from tests.waiting import until

CONFIG = EngineConfig(kv_cache_mb=16, max_num_seqs=16)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=4)


def _blocks_free(engine):
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def test_streams_add_up_to_the_batch_result(scout):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(10, 50)), "the herd runs"]
    expected = LLMEngine.from_pretrained(scout, CONFIG).generate(prompts, params)
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)

    async def consume(prompt):
        pieces, tokens, last = [], [], None
        async for out in engine.generate(prompt, params):
            pieces.append(out.delta_text)
            tokens += out.delta_token_ids
            last = out
        return pieces, tokens, last

    async def main():
        return await asyncio.gather(*(consume(p) for p in prompts))

    for (pieces, tokens, last), want in zip(asyncio.run(main()), expected, strict=True):
        assert tokens == want.token_ids == last.token_ids
        assert "".join(pieces) == want.text == last.text
        assert last.finished and last.finish_reason == "length"
        assert len(pieces) > 1, "tokens arrive step by step, not all at the end"
    assert _blocks_free(engine.engine)


def test_abort_and_a_consumer_that_leaves_both_free_the_blocks(scout):
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def aborted():
        reasons = []
        async for out in engine.generate(list(range(3, 40)), params, request_id="to-abort"):
            if len(out.token_ids) >= 3 and not out.finished:
                engine.abort("to-abort")
            reasons.append(out.finish_reason)
        return reasons

    async def leaves():
        stream = engine.generate(list(range(40, 90)), params, request_id="leaves")
        async for out in stream:
            if len(out.token_ids) >= 2:
                break
        await stream.aclose()  # what a closed HTTP connection does to its generator

    async def main():
        reasons, _ = await asyncio.gather(aborted(), leaves())
        assert await until(lambda: not engine.engine.has_unfinished()), "the left stream's request never ended"
        return reasons

    reasons = asyncio.run(main())
    assert reasons[-1] == "abort" and len(reasons) < 50
    assert _blocks_free(engine.engine)
    assert not engine.engine.has_unfinished()


def test_bad_request_raises_at_once(scout):
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)

    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate("", SamplingParams()):
                pass

    asyncio.run(main())


def test_a_request_that_arrives_while_the_last_outputs_drain_is_served(scout):
    """The engine's loop goes idle by draining the output thread; a client that starts its next request on the
    last output (as a closed-loop client does) submits during that drain, and must not wait forever."""
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)
    drain = engine._pipeline.drain

    def slow_drain():
        time.sleep(0.3)  # the last step's output reaches its stream during this, and the next request comes
        drain()

    engine._pipeline.drain = slow_drain
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def one(prompt):
        return [out async for out in engine.generate(prompt, params)][-1].token_ids

    async def main():
        first = await one([5, 6, 7])
        second = await asyncio.wait_for(one([8, 9, 10]), timeout=30)
        return first, second

    first, second = asyncio.run(main())
    assert len(first) == len(second) == 3


def test_the_engine_serves_a_new_event_loop_after_the_last_one_closed_mid_stream(scout):
    """A caller that runs each batch in its own asyncio.run (tests, scripts) may leave a stream mid-way: the
    output thread then delivers to a closed loop, and the stream's abort comes as that loop shuts down. The next
    loop's requests must still be served."""
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)
    process = engine.engine.outputs.process

    def slow(step):
        time.sleep(0.2)  # the first loop closes while its last step is still being processed
        return process(step)

    engine.engine.outputs.process = slow

    async def leave_early():
        async for _ in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
            return  # the generator is finalised when asyncio.run shuts down: its abort comes then

    asyncio.run(leave_early())
    time.sleep(0.5)

    async def one():
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        return [out async for out in engine.generate([8, 9, 10], params)][-1].token_ids

    async def main():
        return await asyncio.wait_for(one(), timeout=30)

    assert len(asyncio.run(main())) == 3


def test_calls_between_steps_see_the_engine_while_requests_stream(scout):
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    def look(core: LLMEngine) -> int:
        return len(core.scheduler.running)

    def fail(core: LLMEngine) -> int:
        raise ValueError("refused")

    async def main():
        stream = engine.generate(list(range(3, 40)), params)
        first = await anext(stream)
        running = await engine.run_between_steps(look)
        with pytest.raises(ValueError, match="refused"):
            await engine.run_between_steps(fail)
        rest = [out async for out in stream]
        idle = await engine.run_between_steps(look)  # the step loop had stopped: a call starts it again
        return first, running, rest, idle

    first, running, rest, idle = asyncio.run(main())
    assert not first.finished and running == 1, "the call ran while the request was in the engine"
    assert rest[-1].finished and len(rest[-1].token_ids) == 30, "and the request went on after it and the error"
    assert idle == 0


def test_a_step_that_raises_ends_its_requests_with_an_error_and_the_engine_goes_on(scout):
    """A bug in a step (anything but the HerdError a step's requests are failed with) must not stop the step loop
    and leave every stream waiting: the requests end with INTERNAL, their blocks go back, and the next is served."""
    engine = AsyncLLMEngine.from_pretrained(scout, CONFIG)
    run = engine.engine.runner.run
    calls = {"n": 0}

    def broken_once(chunks):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step
            raise RuntimeError("a bug in the step")
        return run(chunks)

    engine.engine.runner.run = broken_once
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def last(prompt):
        outputs = [out async for out in engine.generate(prompt, params)]
        return outputs[-1]

    async def main():
        failed = await asyncio.wait_for(last([5, 6, 7]), 60)
        served = await asyncio.wait_for(last([5, 6, 7]), 60)
        return failed, served

    failed, served = asyncio.run(main())
    assert failed.finish_reason == "error" and failed.error.code.value == "INTERNAL"
    assert "RuntimeError: a bug in the step" in failed.error.message
    assert served.finish_reason == "length" and len(served.token_ids) == 6
    assert _blocks_free(engine.engine)
