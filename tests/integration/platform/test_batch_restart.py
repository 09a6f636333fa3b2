"""A gateway SIGKILLed in the middle of a batch, then started again on the same database and file directory:
the batch completes, every input line has exactly one output line, and the usage ledger has one row per line.
The doors run in a process of their own (no Ray: tests/integration/platform/doors_process.py), their tokens
paced so the kill lands with lines in flight."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import openai

from herd.model.tiny import make_tiny
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.store import TenantStore

LINES = 10
PACE_S = 0.02  # per token: a line of 12 tokens takes about a quarter of a second
REPO = Path(__file__).resolve().parents[3]


def _start(tmp_path: Path, db: str, model: Path) -> tuple[subprocess.Popen[str], int]:
    settings = {"http_port": 0, "grpc_port": 0, "ops_port": 0,
                "tenancy": {"database_url": db, "admin_token_file": str(tmp_path / "admin-token"),
                            "spill_path": str(tmp_path / "journal.jsonl"), "usage_flush_interval_s": 0.1},
                "batch": {"file_dir": str(tmp_path / "files"), "max_in_flight": 2, "poll_interval_s": 0.2}}
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.platform.doors_process", json.dumps(settings),
                             str(model), str(PACE_S)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if match := re.search(r"OpenAI HTTP: http://127\.0\.0\.1:(\d+)/v1", line):
            return proc, int(match.group(1))
    raise AssertionError("the doors never started:\n" + "".join(seen))


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_gateway_killed_mid_batch_finishes_it_after_a_restart(tmp_path):
    model = make_tiny(tmp_path / "scout", preset="scout", seed=11)
    db_path = tmp_path / "herd.db"
    db = f"sqlite:///{db_path}"
    store = TenantStore(connect(db))
    migrate(store.engine)
    store.create_tenant("acme", allowed_models=["scout"])
    key = store.issue_key("acme")[1]
    requests = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": "scout", "prompt": f"Count to {i}:", "max_tokens": 12, "ignore_eos": True}}
                for i in range(LINES)]
    data = "".join(json.dumps(r) + "\n" for r in requests).encode()

    first, port = _start(tmp_path, db, model)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        upload = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        _wait(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 120, "no line finished")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    cut = sqlite3.connect(db_path).execute("select status, completed from batches").fetchone()
    assert cut[0] == "in_progress" and 2 <= cut[1] < LINES, f"the kill did not land mid-batch: {cut}"

    second, port = _start(tmp_path, db, model)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        _wait(lambda: client.batches.retrieve(batch.id).status == "completed", 120, "the batch never completed")
        done = client.batches.retrieve(batch.id)
        output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    finally:
        second.send_signal(signal.SIGINT)
        try:
            second.wait(60)
        except subprocess.TimeoutExpired:
            second.kill()
    assert (done.request_counts.completed, done.request_counts.failed, done.error_file_id) == (LINES, 0, None)
    assert sorted(x["custom_id"] for x in output) == sorted(f"line-{i}" for i in range(LINES)), \
        "every input line has exactly one output line"
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["usage"]["completion_tokens"] == 12
               for x in output)
    rows = sqlite3.connect(db_path).execute("select request_id from usage where tenant_id = 'acme'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(f"{batch.id}-{i}" for i in range(LINES)), \
        "the ledger has one row per request"
