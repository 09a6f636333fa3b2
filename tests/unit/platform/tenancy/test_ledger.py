"""The usage ledger on SQLite: batching, the database going away and coming back, the spill file on
shutdown and its recovery on the next start. No row may be lost or counted twice. Nothing sleeps: the
background writer is awaited through an event that the store sets."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from herd.platform.tenancy.database import connect
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.store import TenantStore

T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=2"  # nothing listens on port 1


@pytest.fixture
def down_store() -> Iterator[TenantStore]:
    engine = connect(UNREACHABLE)
    yield TenantStore(engine)
    engine.dispose()


def row(n: int, *, tenant_id: str = "acme") -> dict[str, Any]:
    return {"time": T0 + timedelta(seconds=n), "tenant_id": tenant_id, "key_id": "k1", "model": "llama",
            "request_id": f"req-{n}", "prompt_tokens": n, "completion_tokens": 2 * n, "cached_tokens": n % 3,
            "status": "ok", "latency_ms": 10 + n}


async def flush(ledger: UsageLedger) -> bool:
    """ledger.flush(), bounded (close likewise): a flush that never finishes fails the test instead of hanging it."""
    return await asyncio.wait_for(ledger.flush(), timeout=10)


async def close(ledger: UsageLedger) -> None:
    await asyncio.wait_for(ledger.close(), timeout=10)


def written(store: TenantStore, tenant_id: str = "acme") -> list[str]:
    """Request ids in the table, in insertion order (duplicates would show)."""
    return [r.request_id for r in store.usage_rows(tenant_id)]


def ids(*numbers: int) -> list[str]:
    return [f"req-{n}" for n in numbers]


class Recording:
    """Wraps a store's record_usage: remembers each batch written, and fails the calls it is told to."""

    def __init__(self, store: TenantStore) -> None:
        self.real = store.record_usage
        self.batches: list[list[str]] = []
        self.fail_calls: set[int] = set()  # 0-based call numbers that raise
        self.calls = 0

    def __call__(self, records: Sequence[dict[str, Any]]) -> None:
        number = self.calls
        self.calls += 1
        if number in self.fail_calls:
            raise OperationalError("INSERT", {}, ConnectionRefusedError("database down"))
        self.real(records)
        self.batches.append([r["request_id"] for r in records])


def test_rows_wait_in_memory_until_a_flush_writes_them(store: TenantStore) -> None:
    async def main() -> None:
        ledger = UsageLedger(store)
        for n in range(3):
            ledger.record(row(n))
        assert ledger.pending == 3
        assert written(store) == []
        assert await flush(ledger) is True
        assert ledger.pending == 0 and ledger.database_ok
        assert written(store) == ids(0, 1, 2)
        assert await flush(ledger) is True  # nothing left: a no-op
        assert written(store) == ids(0, 1, 2)

    asyncio.run(main())
    (first,) = [r for r in store.usage_rows("acme") if r.request_id == "req-1"]
    assert (first.prompt_tokens, first.completion_tokens, first.cached_tokens, first.latency_ms) == (1, 2, 1, 11)


def test_a_flush_writes_in_batches_of_max_batch(store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = Recording(store)
    monkeypatch.setattr(store, "record_usage", recording)

    async def main() -> None:
        ledger = UsageLedger(store, max_batch=2)
        for n in range(5):
            ledger.record(row(n))
        assert await flush(ledger) is True
        assert ledger.pending == 0

    asyncio.run(main())
    assert recording.batches == [ids(0, 1), ids(2, 3), ids(4)]
    assert written(store) == ids(0, 1, 2, 3, 4)


def test_rows_stay_pending_while_the_database_is_unreachable(store: TenantStore, down_store: TenantStore) -> None:
    async def main() -> None:
        ledger = UsageLedger(down_store, max_batch=2)
        for n in range(5):
            ledger.record(row(n))
        assert await flush(ledger) is False
        assert ledger.database_ok is False
        assert ledger.pending == 5
        assert await flush(ledger) is False  # still down: still kept
        assert ledger.pending == 5
        ledger.record(row(5))

        ledger.store = store  # the database is back
        assert await flush(ledger) is True
        assert ledger.database_ok is True
        assert ledger.pending == 0

    asyncio.run(main())
    assert written(store) == ids(0, 1, 2, 3, 4, 5)


def test_a_failure_part_way_keeps_only_the_unwritten_rows(store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = Recording(store)
    recording.fail_calls = {1, 2}  # the second batch fails, and its first retry too
    monkeypatch.setattr(store, "record_usage", recording)

    async def main() -> None:
        ledger = UsageLedger(store, max_batch=2)
        for n in range(5):
            ledger.record(row(n))
        assert await flush(ledger) is False
        assert (ledger.pending, ledger.database_ok) == (3, False)
        assert written(store) == ids(0, 1)
        assert await flush(ledger) is False
        assert ledger.pending == 3
        assert await flush(ledger) is True
        assert (ledger.pending, ledger.database_ok) == (0, True)

    asyncio.run(main())
    assert written(store) == ids(0, 1, 2, 3, 4)


def test_the_background_writer_flushes_on_its_own(store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        ledger = UsageLedger(store, flush_interval_s=0.01)
        flushed = asyncio.Event()
        real_flush = ledger.flush

        async def flush_and_tell() -> bool:
            done = await real_flush()
            flushed.set()
            return done

        monkeypatch.setattr(ledger, "flush", flush_and_tell)
        ledger.start()
        ledger.record(row(0))  # both queued before the writer first wakes
        ledger.record(row(1))
        await asyncio.wait_for(flushed.wait(), timeout=10)
        assert written(store) == ids(0, 1)
        assert ledger.pending == 0
        ledger.record(row(2))
        await close(ledger)  # whatever is left is written on close
        assert ledger.pending == 0

    asyncio.run(main())
    assert written(store) == ids(0, 1, 2)


def test_close_with_the_database_down_spills_and_the_next_start_writes_them_once(
        store: TenantStore, down_store: TenantStore, tmp_path: Path) -> None:
    spill = tmp_path / "spill" / "usage.jsonl"

    async def shut_down_while_down() -> None:
        ledger = UsageLedger(down_store, spill_path=spill, flush_interval_s=3600)
        ledger.start()
        for n in range(4):
            ledger.record(row(n, tenant_id="acme" if n % 2 else "beta"))
        await close(ledger)
        assert ledger.pending == 0
        assert ledger.database_ok is False

    asyncio.run(shut_down_while_down())
    lines = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [r["request_id"] for r in lines] == ids(0, 1, 2, 3)
    assert lines[1] == {**row(1), "time": row(1)["time"].isoformat()}

    async def start_again() -> None:
        ledger = UsageLedger(store, spill_path=spill, flush_interval_s=3600)
        ledger.start()
        assert ledger.pending == 4
        assert len(spill.read_text().splitlines()) == 4, "journaled until the database has them"
        ledger.record(row(4))
        assert await flush(ledger) is True
        await close(ledger)

    asyncio.run(start_again())
    assert written(store, "beta") == ids(0, 2)
    assert written(store, "acme") == ids(1, 3, 4)
    (recovered,) = [r for r in store.usage_rows("acme") if r.request_id == "req-1"]
    assert recovered.time.replace(tzinfo=UTC) == row(1)["time"]
    assert (recovered.prompt_tokens, recovered.completion_tokens, recovered.cached_tokens) == (1, 2, 1)
    assert not spill.exists()

    async def and_again() -> None:  # nothing left to recover: nothing written twice
        ledger = UsageLedger(store, spill_path=spill)
        ledger.start()
        assert ledger.pending == 0
        await close(ledger)

    asyncio.run(and_again())
    assert written(store, "acme") == ids(1, 3, 4)


def test_close_with_the_database_down_and_no_spill_file_keeps_the_rows(down_store: TenantStore) -> None:
    async def main() -> None:
        ledger = UsageLedger(down_store)  # never started: close must still try to write
        ledger.record(row(0))
        ledger.record(row(1))
        await close(ledger)
        assert ledger.pending == 2  # nowhere to put them: not silently dropped
        assert ledger.database_ok is False

    asyncio.run(main())


def test_a_spill_adds_to_rows_already_in_the_spill_file(down_store: TenantStore, tmp_path: Path) -> None:
    spill = tmp_path / "usage.jsonl"
    spill.write_text(json.dumps({**row(0), "time": row(0)["time"].isoformat()}) + "\n")  # left by an earlier run

    async def main() -> None:
        ledger = UsageLedger(down_store, spill_path=spill)  # closed without a start: nothing was recovered
        ledger.record(row(1))
        await close(ledger)

    asyncio.run(main())
    assert [json.loads(line)["request_id"] for line in spill.read_text().splitlines()] == ids(0, 1)


def test_a_spill_of_rows_already_written_is_not_counted_twice(store: TenantStore, tmp_path: Path) -> None:
    """A shutdown can spill a batch whose insert did commit (the answer was lost); recovery must skip it."""
    spill = tmp_path / "usage.jsonl"
    store.record_usage([row(0), row(1)])
    spill.write_text("".join(json.dumps({**row(n), "time": row(n)["time"].isoformat()}) + "\n" for n in (0, 1, 2)))

    async def main() -> None:
        ledger = UsageLedger(store, spill_path=spill)
        ledger.start()
        assert ledger.pending == 3
        await close(ledger)

    asyncio.run(main())
    assert written(store) == ids(0, 1, 2)


def test_two_shutdowns_while_down_both_spill_and_both_recover(
        store: TenantStore, down_store: TenantStore, tmp_path: Path) -> None:
    spill = tmp_path / "usage.jsonl"

    async def down(numbers: range) -> None:
        ledger = UsageLedger(down_store, spill_path=spill)
        ledger.start()  # recovers the earlier spill, fails again, spills it all again
        for n in numbers:
            ledger.record(row(n))
        await close(ledger)

    asyncio.run(down(range(0, 2)))
    asyncio.run(down(range(2, 4)))
    assert [json.loads(line)["request_id"] for line in spill.read_text().splitlines()] == ids(0, 1, 2, 3)

    async def up() -> None:
        ledger = UsageLedger(store, spill_path=spill)
        ledger.start()
        await close(ledger)

    asyncio.run(up())
    assert written(store) == ids(0, 1, 2, 3)
    assert not spill.exists()


def test_one_batch_with_a_repeated_request_id_does_not_block_the_ledger(store: TenantStore) -> None:
    """A client can send the same gRPC request_id twice; that must not keep every other row out of the table
    (and the ledger reporting the database as down) for good."""

    async def main() -> None:
        ledger = UsageLedger(store)
        ledger.record(row(0))
        ledger.record(row(1))
        ledger.record({**row(1), "prompt_tokens": 99})  # the same request id again
        ledger.record(row(2, tenant_id="beta"))
        assert await flush(ledger) is True
        assert ledger.database_ok is True
        assert ledger.pending == 0

    asyncio.run(main())
    assert sorted(written(store)) == ids(0, 1)
    assert written(store, "beta") == ids(2)


def test_overlapping_flushes_lose_no_row(store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """flush() is public and the background writer calls it too. Two flushes started together, and a row
    recorded while the first one's write is still in flight, must end with every row written once."""
    in_write = threading.Event()
    release = threading.Event()
    calls = iter(range(1_000))
    real = store.record_usage

    def gated_record(records: Sequence[dict[str, Any]]) -> None:
        if next(calls) == 0:
            in_write.set()
            release.wait(timeout=10)
        real(records)

    monkeypatch.setattr(store, "record_usage", gated_record)

    async def main() -> None:
        ledger = UsageLedger(store)
        ledger.record(row(0))
        ledger.record(row(1))
        first = asyncio.create_task(flush(ledger))
        second = asyncio.create_task(flush(ledger))
        await asyncio.to_thread(in_write.wait, 10)  # the first write is under way
        await asyncio.wait({second}, timeout=0.5)  # an unguarded second flush would finish meanwhile
        ledger.record(row(2))  # arrives while the first write is in flight
        release.set()
        assert await first is True
        assert await second is True
        assert await flush(ledger) is True
        assert ledger.pending == 0

    asyncio.run(main())
    assert sorted(written(store)) == ids(0, 1, 2)


def test_a_killed_gateway_loses_no_row_and_open_requests_come_back_interrupted(store: TenantStore,
                                                                                tmp_path: Path) -> None:
    """The process dies without close(): what the journal holds is written at the next start, once."""
    journal = tmp_path / "usage.jsonl"

    async def work_then_die() -> None:
        ledger = UsageLedger(store, spill_path=journal, flush_interval_s=3600)
        ledger.start()
        for n in range(3):
            ledger.open({**row(n), "completion_tokens": 0, "cached_tokens": 0, "status": "admitted"})
        ledger.record(row(0))  # finished and flushed
        assert await flush(ledger) is True
        ledger.record(row(1))  # finished, not yet flushed; req-2 still streaming when the process dies
        ledger.journal._out.close()  # what a SIGKILL leaves: the kernel has the lines, no close() ran

    asyncio.run(work_then_die())
    assert written(store) == ids(0)

    async def start_again() -> None:
        ledger = UsageLedger(store, spill_path=journal, flush_interval_s=3600)
        ledger.start()
        assert ledger.pending == 2
        assert await flush(ledger) is True
        await close(ledger)

    asyncio.run(start_again())
    assert written(store) == ids(0, 1, 2)
    rows = {r.request_id: r for r in store.usage_rows("acme")}
    assert rows["req-1"].status == row(1)["status"] and rows["req-1"].completion_tokens == row(1)["completion_tokens"]
    assert rows["req-2"].status == "interrupted" and rows["req-2"].completion_tokens == 0
    assert rows["req-2"].prompt_tokens == row(2)["prompt_tokens"], "the prompt it was admitted with"
    assert not journal.exists()


def test_a_line_cut_short_by_the_kill_is_skipped(tmp_path: Path) -> None:
    from herd.platform.tenancy.journal import UsageJournal

    journal = UsageJournal(tmp_path / "usage.jsonl")
    journal.finished(row(0))
    journal.close()
    with (tmp_path / "usage.jsonl").open("a") as out:
        out.write('{"request_id": "req-1", "tim')
    assert [r["request_id"] for r in journal.recover()] == ["req-0"]


def test_close_writes_the_keys_last_uses(store: TenantStore) -> None:
    store.create_tenant("acme")
    key, plaintext = store.issue_key("acme")
    assert store.authenticate(plaintext, now=T0) is not None
    assert store.authenticate(plaintext, now=T0 + timedelta(hours=1)) is not None  # cached: kept in memory

    async def main() -> None:
        ledger = UsageLedger(store)
        ledger.start()
        await close(ledger)

    asyncio.run(main())
    (stored,) = store.list_keys("acme")
    assert stored.id == key.id and stored.last_used_at is not None
    assert stored.last_used_at.replace(tzinfo=UTC) == T0 + timedelta(hours=1)


def test_the_writer_writes_last_uses_every_few_seconds(store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("herd.platform.tenancy.ledger.LAST_USED_INTERVAL_S", 0.0)
    written_last_uses = threading.Event()
    flush_last_used = store.flush_last_used

    def flushed() -> int:
        count = flush_last_used()
        if count:
            written_last_uses.set()
        return count

    monkeypatch.setattr(store, "flush_last_used", flushed)
    store.create_tenant("acme")
    _, plaintext = store.issue_key("acme")
    assert store.authenticate(plaintext, now=T0) is not None
    assert store.authenticate(plaintext, now=T0 + timedelta(hours=1)) is not None

    async def main() -> None:
        ledger = UsageLedger(store, flush_interval_s=0.01)
        ledger.start()
        assert await asyncio.to_thread(written_last_uses.wait, 10)
        ledger._task.cancel()  # not close(): the writer alone wrote them

    asyncio.run(main())
    assert store.list_keys("acme")[0].last_used_at.replace(tzinfo=UTC) == T0 + timedelta(hours=1)


def test_a_database_write_that_hangs_is_given_up_and_retried_once_it_answers(
        store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = threading.Event()
    real = store.record_usage

    def hangs(records: Sequence[dict[str, Any]]) -> None:
        answers.wait()
        real(records)

    monkeypatch.setattr(store, "record_usage", hangs)

    async def main() -> None:
        ledger = UsageLedger(store, timeout_s=0.05)
        ledger.record(row(0))
        assert await flush(ledger) is False  # bounded: not stalled behind the hung write
        assert (ledger.pending, ledger.database_ok) == (1, False)
        answers.set()
        assert await flush(ledger) is True

    asyncio.run(main())
    assert written(store) == ids(0), "the hung write landed too: still one row"
