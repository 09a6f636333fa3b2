"""The text side on its own thread, one step behind the core: the same outputs as inline steps, delivered from
the output thread, and a stop string found there costs at most one step and never a wrong output."""

from __future__ import annotations

import threading

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.step_pipeline import StepPipeline
from herd.model.tiny import make_tiny

CONFIG = EngineConfig(kv_cache_mb=16, max_num_seqs=16)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=3)


def _prompts(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (count,), generator=g)]


def _stop_inside(text, width, start):
    return next(text[i : i + width] for i in range(start, len(text) - width) if "\ufffd" not in text[i : i + width])


def _run_pipelined(engine, requests):
    """Add the requests, drive the pipeline to the end; every output delivered, with the delivering thread."""
    delivered, threads = [], set()

    def deliver(outputs):
        threads.add(threading.current_thread().name)
        delivered.extend(outputs)

    pipeline = StepPipeline(engine, deliver)
    for prompt, params, rid in requests:
        engine.add_request(prompt, params, request_id=rid)
    core_steps = 0
    while engine.has_unfinished():
        pipeline.step()
        core_steps += 1
    pipeline.close()
    return delivered, threads, core_steps


def _final(outputs):
    return {o.request_id: o for o in outputs if o.finished}


def test_pipelined_outputs_equal_inline_steps_with_stop_strings_and_logprobs(scout):
    prompts = _prompts(6, 0)
    free = LLMEngine.from_pretrained(scout, CONFIG).generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                                      ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        stops = [_stop_inside(out.text, 3, 6)] if i % 2 == 0 else []
        params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stops, logprobs=2,
                                     seed=i, include_stop_str_in_output=i == 4))
    requests = [(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]

    inline_engine = LLMEngine.from_pretrained(scout, CONFIG)
    inline = []
    for prompt, sp, rid in requests:
        inline_engine.add_request(prompt, sp, request_id=rid)
    while inline_engine.has_unfinished():
        inline += inline_engine.step()

    engine = LLMEngine.from_pretrained(scout, CONFIG)
    pipelined, threads, _ = _run_pipelined(engine, requests)
    assert threads == {t for t in threads if t.startswith("herd-outputs")} and threads, threads
    want, got = _final(inline), _final(pipelined)
    assert set(got) == set(want) == {rid for _, _, rid in requests}
    for rid, out in want.items():
        assert (got[rid].token_ids, got[rid].text, got[rid].finish_reason) == (out.token_ids, out.text,
                                                                                out.finish_reason), rid
        # the batches differ by the one step a stopped request stays on the core: float rounding only
        assert [(t.token_id, [i for i, _ in t.top]) for t in got[rid].logprobs] == \
            [(t.token_id, [i for i, _ in t.top]) for t in out.logprobs]
        assert [t.logprob for t in got[rid].logprobs] == pytest.approx([t.logprob for t in out.logprobs], abs=1e-4)
        streamed = [o for o in pipelined if o.request_id == rid]
        assert [t for o in streamed for t in o.delta_token_ids] == out.token_ids, "no token repeated or lost"
        assert "".join(o.delta_text for o in streamed) == out.text
        assert sum(o.finished for o in streamed) == 1
    assert sum(o.finish_reason == "stop" for o in want.values()) == 3
    assert all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def test_a_stop_string_costs_at_most_one_extra_core_step(scout):
    prompt = _prompts(1, 1)[0]
    text = LLMEngine.from_pretrained(scout, CONFIG).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].text
    stop = _stop_inside(text, 2, 4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    engine = LLMEngine.from_pretrained(scout, CONFIG)
    outputs, _, core_steps = _run_pipelined(engine, [(prompt, params, "s")])
    final = _final(outputs)["s"]
    assert final.finish_reason == "stop" and final.text == text[: text.index(stop)]
    # one step prefills and samples the first token, then one per token; the stop found one step late
    assert len(final.token_ids) < 40
    assert core_steps <= len(final.token_ids) + 1


def test_processing_overlaps_the_next_core_step(scout):
    """The output thread is busy with step N while the core computes step N+1: a deliver that waits for the
    core to start its next step would deadlock an engine that processed inline."""
    engine = LLMEngine.from_pretrained(scout, CONFIG)
    started = threading.Condition()
    runs = [0]
    original = engine.runner.run

    def run(chunks):
        with started:
            runs[0] += 1
            started.notify_all()
        return original(chunks)

    engine.runner.run = run
    overlapped = []

    def deliver(outputs):
        if all(o.finished for o in outputs):
            return  # the last step: no core step follows
        step = len(overlapped) + 1  # these are core step `step`'s outputs
        with started:
            overlapped.append(started.wait_for(lambda: runs[0] > step, timeout=30))

    pipeline = StepPipeline(engine, deliver)
    engine.add_request(_prompts(1, 2)[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    while engine.has_unfinished():
        pipeline.step()
    engine.runner.run = original
    pipeline.close()
    assert overlapped == [True] * 4
