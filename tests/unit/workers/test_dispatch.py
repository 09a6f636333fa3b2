"""ExpertDispatcher over a fake transport: each shard gets the rows of its experts (a replicated expert's
split evenly, in replica order), the outputs land back where their rows came from, the expert load
is counted by expert id, and a transport that serves other experts than the placement is refused.
Submit sends at once and the returned function waits (issue 21): a traced step's dispatch span runs from the
submit to the end of the wait, without staying current in between.

Legend: R rows, H hidden, G groups (one per expert, in placement order)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from herd.engine.errors import Code, HerdError
from herd.workers import dispatch as dispatch_module
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.expert_load import ExpertLoad
from herd.workers.placement import Placement, place_experts
from herd.workers.transport import ShardWork, TransportStats

H = 6


def expert_fn(layer: int, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """What 'expert' computes in the fake: distinct per layer and expert, row by row."""
    return rows * (expert + 1) + 100 * layer


class FakeTransport:
    """Runs each shard's experts in this process when waited for, checking the work is shaped as the shard
    expects; `events` records each submit and wait, with the span current at the time."""

    def __init__(self, shard_experts: list[tuple[int, ...]]) -> None:
        self.experts = shard_experts
        self.calls: list[tuple[int, list[ShardWork]]] = []
        self.events: list[tuple[str, int, trace.Span]] = []
        self.stats = TransportStats()
        self.fail_wait: Exception | None = None

    def shard_experts(self) -> list[tuple[int, ...]]:
        return self.experts

    def healthy(self) -> bool:
        return True

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        self.calls.append((layer, work))
        self.events.append(("submit", layer, trace.get_current_span()))
        for experts, w in zip(self.experts, work, strict=True):
            assert len(w.counts) == len(experts) and sum(w.counts) == w.rows.shape[0]

        def wait() -> list[torch.Tensor]:
            self.events.append(("wait", layer, trace.get_current_span()))
            if self.fail_wait is not None:
                raise self.fail_wait
            outputs = []
            for experts, w in zip(self.experts, work, strict=True):
                chunks = torch.split(w.rows, w.counts)
                outputs.append(torch.cat([expert_fn(layer, e, c) for e, c in zip(experts, chunks, strict=True)]))
            return outputs

        return wait

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        return self.submit(layer, work)()


def dispatcher(placement: Placement, **kwargs) -> tuple[ExpertDispatcher, FakeTransport]:
    transport = FakeTransport([tuple(e) for e in placement.shard_experts])
    return ExpertDispatcher(placement, transport, **kwargs), transport


def offsets(counts: list[int]) -> torch.Tensor:
    """[G+1] group bounds from rows per group."""
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])


def expected(placement: Placement, layer: int, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The direct computation: every group's rows through its expert, in place."""
    out = torch.empty_like(rows)
    bounds = offsets(counts).tolist()
    for g, expert in enumerate(placement.expert_order):
        out[bounds[g] : bounds[g + 1]] = expert_fn(layer, expert, rows[bounds[g] : bounds[g + 1]])
    return out


@pytest.mark.parametrize(("experts", "shards"), [(16, 1), (16, 4), (10, 3), (128, 8)])
def test_each_shard_gets_its_experts_rows_and_outputs_go_back_in_place(experts, shards):
    placement = place_experts(experts, shards)
    d, transport = dispatcher(placement)
    g = torch.Generator().manual_seed(experts + shards)
    counts = torch.randint(0, 5, (experts,), generator=g).tolist()
    rows = torch.randn(sum(counts), H, generator=g)

    out = d(2, rows, offsets(counts))
    assert torch.equal(out, expected(placement, 2, rows, counts))
    ((layer, work),) = transport.calls
    assert layer == 2 and len(work) == shards
    bounds = offsets(counts).tolist()
    for shard, (owned, w) in enumerate(zip(placement.shard_experts, work, strict=True)):
        assert w.counts == [counts[e] for e in owned], shard
        first, last = owned[0], owned[-1]  # contiguous ranges: one slice of the permuted rows
        assert torch.equal(w.rows, rows[bounds[first] : bounds[last + 1]]), shard
        assert w.trace_context == {}, "an untraced step sends no trace context"


def test_a_replicated_experts_rows_are_split_evenly_in_replica_order():
    load = [1.0] * 8
    load[1] = 50.0
    placement = place_experts(8, 2, expert_load=load, replicate_hot=1)
    assert placement.shard_experts == ((0, 1, 2, 3), (1, 4, 5, 6, 7)) and placement.replicas[1] == (0, 1)
    d, transport = dispatcher(placement)
    counts = [2, 5, 1, 0, 3, 0, 2, 1]  # bounds 0 2 7 8 8 11 11 13 14; expert 1 holds rows 2..7
    rows = torch.arange(14 * H, dtype=torch.float32).reshape(14, H)

    out = d(0, rows, offsets(counts))
    assert torch.equal(out, expected(placement, 0, rows, counts))
    (_, (primary, replica)), = transport.calls
    assert primary.counts == [2, 2, 1, 0] and replica.counts == [3, 3, 0, 2, 1], "5 rows: 5 * 1 // 2 to the primary"
    assert torch.equal(primary.rows, torch.cat([rows[0:4], rows[7:8]]))
    assert torch.equal(replica.rows, torch.cat([rows[4:7], rows[8:14]]))


def test_a_shard_whose_experts_got_no_rows_is_sent_empty_work():
    placement = place_experts(8, 2)
    d, transport = dispatcher(placement)
    counts = [3, 1, 0, 2, 0, 0, 0, 0]
    rows = torch.randn(6, H)
    out = d(1, rows, offsets(counts))
    assert torch.equal(out, expected(placement, 1, rows, counts))
    (_, (busy, idle)), = transport.calls
    assert busy.counts == [3, 1, 0, 2] and idle.counts == [0, 0, 0, 0]
    assert idle.rows.shape == (0, H)

    empty = d(1, rows[:0], offsets([0] * 8))
    assert empty.shape == (0, H)


def test_groups_map_to_experts_through_the_placement_order():
    # Shards own interleaved experts, so group g is expert expert_order[g], not expert g.
    placement = Placement(num_experts=4, shard_experts=((1, 3), (0, 2)), expert_order=(1, 3, 0, 2),
                          replicas={1: (0,), 3: (0,), 0: (1,), 2: (1,)})
    load = ExpertLoad(4)
    d, transport = dispatcher(placement, load=load)
    counts = [1, 2, 3, 4]  # groups: expert 1, 3, 0, 2
    rows = torch.randn(10, H)

    out = d(5, rows, offsets(counts))
    assert torch.equal(out, expected(placement, 5, rows, counts))
    (_, (first, second)), = transport.calls
    assert first.counts == [1, 2] and second.counts == [3, 4]
    d(5, rows, offsets(counts))
    d(7, rows[:4], offsets([0, 4, 0, 0]))
    assert load.snapshot() == {5: [6, 2, 8, 4], 7: [0, 0, 0, 4]}, "rows counted by expert id, summed over calls"
    assert d.load is load


def test_the_load_is_counted_without_one_being_given():
    d, _ = dispatcher(place_experts(4, 2))
    d(0, torch.randn(3, H), offsets([0, 1, 2, 0]))
    assert d.load.snapshot() == {0: [0, 1, 2, 0]}


def test_a_transport_serving_other_experts_than_the_placement_is_refused():
    placement = place_experts(8, 2)
    for served in ([(0, 1, 2), (3, 4, 5, 6, 7)], [(0, 1, 2, 3)], [(0, 1, 2, 3), (4, 5, 6, 7), (7,)]):
        with pytest.raises(ValueError, match=r"the shards own .* the placement expects"):
            ExpertDispatcher(placement, FakeTransport(served))
    # The same experts in another order would read each shard's counts against the wrong experts.
    with pytest.raises(ValueError, match=r"in their count order"):
        ExpertDispatcher(placement, FakeTransport([(3, 2, 1, 0), (7, 6, 5, 4)]))


def test_the_observe_callback_gets_each_calls_duration():
    seen: list[float] = []
    d, _ = dispatcher(place_experts(4, 2), observe_s=seen.append)
    for _ in range(3):
        d(0, torch.randn(4, H), offsets([1, 1, 1, 1]))
    assert len(seen) == 3 and all(isinstance(s, float) and 0.0 <= s < 60.0 for s in seen)


@pytest.fixture
def spans(monkeypatch):
    """The dispatcher's tracer, recording into memory (a provider of the test's own, not the global one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(dispatch_module, "tracer", provider.get_tracer("test"))
    yield provider.get_tracer("test.step"), exporter
    provider.shutdown()


def test_submit_sends_at_once_and_the_wait_gives_what_a_call_gives():
    placement = place_experts(16, 4)
    g = torch.Generator().manual_seed(21)
    counts = torch.randint(0, 5, (16,), generator=g).tolist()
    rows = torch.randn(sum(counts), H, generator=g)
    load, seen = ExpertLoad(16), []
    d, transport = dispatcher(placement, load=load, observe_s=seen.append)

    wait = d.submit(3, rows, offsets(counts))
    assert [(e, layer) for e, layer, _ in transport.events] == [("submit", 3)], "sent, not yet waited for"
    assert load.snapshot() == {3: counts}, "the load is counted at submit"
    assert seen == [], "the duration is observed when the outputs are in"
    out = wait()
    assert [(e, layer) for e, layer, _ in transport.events] == [("submit", 3), ("wait", 3)]
    assert len(seen) == 1 and 0.0 <= seen[0] < 60.0
    assert torch.equal(out, expected(placement, 3, rows, counts))
    assert torch.equal(out, d(3, rows, offsets(counts)))


def test_a_traced_steps_dispatch_span_runs_from_submit_to_the_end_of_the_wait(spans):
    step_tracer, exporter = spans
    placement = place_experts(8, 2)
    d, transport = dispatcher(placement)
    counts = [3, 1, 0, 2, 1, 1, 0, 4]
    rows = torch.randn(12, H)

    with step_tracer.start_as_current_span("step") as step:
        wait = d.submit(4, rows, offsets(counts))
        assert trace.get_current_span() is step, "the dispatch span is not left current after submit"
        assert exporter.get_finished_spans() == (), "the dispatch is still in flight"
        out = wait()
        assert trace.get_current_span() is step
    assert torch.equal(out, expected(placement, 4, rows, counts))

    dispatch, = (s for s in exporter.get_finished_spans() if s.name == "herd.expert_dispatch")
    assert dispatch.parent.span_id == step.get_span_context().span_id
    assert dict(dispatch.attributes) == {"herd.layer": 4, "herd.rows": 12, "herd.shards": 2}
    (_, _, at_submit), (_, _, at_wait) = transport.events
    assert at_submit.get_span_context().span_id == dispatch.context.span_id, "the sends are inside the span"
    assert at_wait.get_span_context().span_id == dispatch.context.span_id, "and so is the wait"
    (_, work), = transport.calls
    for w in work:  # the shards' compute joins the trace under the dispatch
        assert f"{dispatch.context.span_id:016x}" in w.trace_context["traceparent"]


def test_a_failed_wait_ends_the_dispatch_span_with_the_error(spans):
    step_tracer, exporter = spans
    d, transport = dispatcher(place_experts(4, 2))
    transport.fail_wait = HerdError(Code.UNAVAILABLE, "a shard is gone")
    with step_tracer.start_as_current_span("step"):
        wait = d.submit(0, torch.randn(4, H), offsets([1, 1, 1, 1]))
        with pytest.raises(HerdError, match="a shard is gone"):
            wait()
    dispatch, = (s for s in exporter.get_finished_spans() if s.name == "herd.expert_dispatch")
    assert dispatch.status.status_code == trace.StatusCode.ERROR
    assert [e.name for e in dispatch.events] == ["exception"]


def test_an_untraced_submit_makes_no_span(spans):
    _, exporter = spans
    d, transport = dispatcher(place_experts(4, 2))
    d.submit(0, torch.randn(4, H), offsets([1, 1, 1, 1]))()
    assert exporter.get_finished_spans() == ()
    (_, work), = transport.calls
    assert all(w.trace_context == {} for w in work)


def test_a_paused_dispatcher_refuses_steps_held_while_restarting_and_not_held_once_lost():
    from herd.engine.fault_hold import EXPERTS_LOST, FaultHold

    placement = place_experts(8, 2)
    d, transport = dispatcher(placement)
    rows, counts = torch.randn(8, H), [1] * 8
    d.pause()
    with pytest.raises(HerdError) as restarting:
        d(0, rows, offsets(counts))
    assert restarting.value.code == Code.UNAVAILABLE and restarting.value.reason is None
    assert "restarting" in restarting.value.message and not transport.calls, "nothing reached the shards"
    assert FaultHold(30).on_failure(restarting.value) is None, "the engine holds the step"
    d.pause(lost=True)
    with pytest.raises(HerdError) as lost:
        d(0, rows, offsets(counts))
    assert lost.value.code == Code.UNAVAILABLE and lost.value.reason == EXPERTS_LOST
    assert FaultHold(30).on_failure(lost.value) is lost.value, "its requests end at once"
    d.resume()
    torch.testing.assert_close(d(0, rows, offsets(counts)), expected(placement, 0, rows, counts))
