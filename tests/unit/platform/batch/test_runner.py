"""The batch runner over SQLite and the in-process tiny replica: lines through the gateway's request path as
the tenant's batch class, resumed after a stop by a runner on the same database, expired past the window."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from herd.platform.batch.runner import BatchRunner, RunnerSettings
from herd.platform.batch.store import BatchStore
from herd.platform.gateway.backend import LocalBackend
from herd.platform.tenancy.database import connect
from tests.unit.platform.batch.world import chat_lines, make_world
from tests.waiting import until


@pytest.fixture
def world(tmp_path, core):
    return make_world(tmp_path, LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8))


async def _create(world, data: bytes, tenant="acme"):
    upload = await world.batches.upload(tenant, filename="in.jsonl", purpose="batch", data=data)
    return await world.batches.create(tenant, input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"job": "nightly"})


async def _lines(world, file_id, tenant="acme"):
    return [json.loads(x) for x in (await world.batches.content(tenant, file_id)).splitlines()]


def test_a_batch_runs_every_line_once_as_the_tenants_batch_class(world):
    async def main():
        world.ledger.start()
        runner = world.runner(max_in_flight=3)
        runner.start()
        job = await _create(world, chat_lines(5))
        assert await until(lambda: world.batch_store.batch("acme", job.id).status == "completed", 60)
        await runner.stop()
        await world.ledger.close()
        return world.batch_store.batch("acme", job.id)

    done = asyncio.run(main())
    assert (done.total, done.completed, done.failed, done.error_file_id) == (5, 5, 0, None)
    output = asyncio.run(_lines(world, done.output_file_id))
    assert sorted(x["custom_id"] for x in output) == [f"req-{i}" for i in range(5)]
    for line in output:
        index = int(line["custom_id"].split("-")[1])
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["request_id"] == f"{done.id}-{index}"
        assert line["response"]["body"]["object"] == "chat.completion"
        assert line["response"]["body"]["usage"]["completion_tokens"] >= 1
    seen = world.backend.requests
    assert {r.tenant.tenant_id for r in seen} == {"acme:batch"}, "the engine sees the tenant's batch class"
    assert [r.tenant.weight for r in seen] == pytest.approx([0.1] * 5), "at a tenth of the tenant's weight"
    rows = world.store.usage_rows("acme")
    assert sorted(r.request_id for r in rows) == sorted(f"{done.id}-{i}" for i in range(5)), "one row per line"
    assert all(r.status == "ok" and r.key_id is None for r in rows)


def test_a_runner_stopped_mid_batch_is_finished_by_a_new_one_on_the_same_database(world):
    lines = 8

    async def first():
        world.ledger.start()
        runner = world.runner(max_in_flight=2)
        runner.start()
        job = await _create(world, chat_lines(lines, max_tokens=12))
        assert await until(lambda: world.batch_store.batch("acme", job.id).completed >= 2, 60)
        await runner.stop()  # lines in flight are aborted: they stay pending
        return job.id

    batch_id = asyncio.run(first())
    stopped = world.batch_store.batch("acme", batch_id)
    assert stopped.status == "in_progress" and 2 <= stopped.completed < lines
    ran_before = len(world.backend.requests)
    left = {f"{batch_id}-{i.line}" for i in world.batch_store.pending_lines(batch_id, limit=lines)}

    async def second():
        store = BatchStore(connect(world.url))  # another process's view: nothing shared but the database
        runner = BatchRunner(store, world.files, world.gateway, world.identity,
                             settings=RunnerSettings(poll_interval_s=0.05))
        runner.start()  # told of nothing: it finds the batch in the database
        assert await until(lambda: store.batch(None, batch_id).status == "completed", 60)
        await runner.stop()
        await world.ledger.close()

    asyncio.run(second())
    done = world.batch_store.batch("acme", batch_id)
    assert (done.completed, done.failed) == (lines, 0)
    output = asyncio.run(_lines(world, done.output_file_id))
    assert sorted(x["custom_id"] for x in output) == sorted(f"req-{i}" for i in range(lines)), \
        "every line exactly one output line"
    ran_after = [r.request_id.split(".")[0] for r in world.backend.requests[ran_before:]]
    assert sorted(ran_after) == sorted(left), "the second runner runs each line left pending, once"
    rows = world.store.usage_rows("acme")
    assert sorted(r.request_id for r in rows) == sorted(f"{batch_id}-{i}" for i in range(lines)), \
        "the ledger has one row per request, a line run twice included"


def test_past_the_window_pending_lines_are_expired(world):
    now = [datetime.now(UTC)]

    async def main():
        job = await _create(world, chat_lines(3))
        runner = world.runner()
        runner.clock = lambda: now[0]
        now[0] += timedelta(hours=24, seconds=1)
        await runner.round()
        return job.id

    batch_id = asyncio.run(main())
    done = world.batch_store.batch("acme", batch_id)
    assert (done.status, done.failed, done.output_file_id) == ("expired", 3, None)
    errors = asyncio.run(_lines(world, done.error_file_id))
    assert [(x["custom_id"], x["error"]["code"], x["response"]) for x in errors] == \
        [(f"req-{i}", "batch_expired", None) for i in range(3)]
    assert world.backend.requests == []


def test_a_cancelled_batch_starts_no_more_lines(world):
    async def main():
        job = await _create(world, chat_lines(4))
        cancelled = await world.batches.cancel("acme", job.id)
        assert cancelled.status == "cancelling"
        runner = world.runner()
        await runner.round()
        return job.id

    batch_id = asyncio.run(main())
    done = world.batch_store.batch("acme", batch_id)
    assert (done.status, done.completed, done.failed) == ("cancelled", 0, 0)
    assert done.cancelled_at is not None and world.backend.requests == []


def test_a_request_refused_by_the_engine_is_an_error_line(world):
    bad = json.dumps({"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "scout", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 100000}}).encode() + b"\n"
    unknown = json.dumps({"custom_id": "no-model", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}}).encode()

    async def main():
        runner = world.runner()
        runner.start()
        job = await _create(world, chat_lines(1) + bad + unknown)
        assert await until(lambda: world.batch_store.batch("acme", job.id).status == "completed", 60)
        await runner.stop()
        return world.batch_store.batch("acme", job.id)

    done = asyncio.run(main())
    assert (done.completed, done.failed) == (1, 2)
    errors = {x["custom_id"]: x for x in asyncio.run(_lines(world, done.error_file_id))}
    assert errors["too-long"]["response"]["status_code"] == 400
    assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors["no-model"]["response"]["status_code"] == 404


def test_the_slots_are_shared_between_batches(world):
    started: list[str] = []

    async def main():
        gate = asyncio.Event()

        async def run(_gateway, _identity, *, batch_id, index, custom_id, **_):
            started.append(batch_id)
            await gate.wait()
            return "completed", {"custom_id": custom_id}

        big = await _create(world, chat_lines(6))
        small = await _create(world, chat_lines(2), tenant="umbrella")
        runner = world.runner(max_in_flight=2)
        runner._run = run
        await runner.round()
        assert await until(lambda: len(started) == 2)
        first = list(started)
        gate.set()
        await runner.idle()
        await runner.stop()
        return big.id, small.id, first

    big, small, first = asyncio.run(main())
    assert sorted(first) == sorted([big, small]), "each batch got one of the two slots, not the older both"
