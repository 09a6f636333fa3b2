"""The usage journal's file and directory are owner-only whatever the umask (it holds tenants' usage)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from herd.platform.tenancy.journal import UsageJournal

ROW = {"time": datetime(2025, 3, 14, tzinfo=UTC), "tenant_id": "acme", "key_id": None, "model": "llama",
       "request_id": "r1", "prompt_tokens": 3, "completion_tokens": 0, "cached_tokens": 0, "status": "ok",
       "latency_ms": 1}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def test_an_appended_journal_is_owner_only(tmp_path):
    journal = UsageJournal(tmp_path / ".herd" / "usage-spill.jsonl")
    journal.opened(ROW)
    journal.close()
    assert _mode(journal.path) == 0o600 and _mode(journal.path.parent) == 0o700
    assert [r["status"] for r in journal.recover()] == ["interrupted"]


def test_a_compacted_journal_is_owner_only(tmp_path):
    journal = UsageJournal(tmp_path / "usage-spill.jsonl")
    journal.compact([ROW], [])
    assert _mode(journal.path) == 0o600 and [r["request_id"] for r in journal.recover()] == ["r1"]
    assert [p.name for p in tmp_path.iterdir()] == ["usage-spill.jsonl"]


def test_a_stale_temporary_file_does_not_lend_its_mode(tmp_path):
    """A .tmp left world-readable by a crash mid-compaction is replaced, not reused with its mode."""
    journal = UsageJournal(tmp_path / "usage-spill.jsonl")
    stale = tmp_path / "usage-spill.jsonl.tmp"
    stale.write_text("half a line")
    stale.chmod(0o644)
    journal.compact([ROW], [])
    assert _mode(journal.path) == 0o600
