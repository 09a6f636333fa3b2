"""SIGTERM, then SIGKILL once the shutdown budget is spent (as Kubernetes stops a pod): no usage row is lost,
and each row counts at least the tokens its client received. The doors run in a process of their own (no
Ray: tests/integration/platform/doors_process.py) over SQLite tenancy, with streams paced to outlive the budget."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from herd.model.tiny import make_tiny
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.journal import UsageJournal
from herd.platform.tenancy.store import TenantStore
from tests.waiting import until

SHUTDOWN_TIMEOUT_S = 3.0
KILL_MARGIN_S = 2.0  # Kubernetes' SIGKILL comes at the grace period; the budget is set under it
STREAMS = 4
PACE_S = 0.1  # per chunk: a 400-token stream lasts 40 s, far past the budget
REPO = Path(__file__).resolve().parents[3]


def _start(tmp_path: Path, db: str, model: Path) -> tuple[subprocess.Popen[str], int]:
    settings = {"http_port": 0, "grpc_port": 0, "ops_port": 0, "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S,
                "tenancy": {"database_url": db, "admin_token_file": str(tmp_path / "admin-token"),
                            "spill_path": str(tmp_path / "journal.jsonl"), "usage_flush_interval_s": 0.2}}
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.platform.doors_process", json.dumps(settings),
                             str(model), str(PACE_S)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if match := re.search(r"OpenAI HTTP: http://127\.0\.0\.1:(\d+)/v1", line):
            return proc, int(match.group(1))
    raise AssertionError("the doors never started:\n" + "".join(seen))


async def _stream(client: httpx.AsyncClient, key: str, received: dict[str, int]) -> None:
    """One long streamed chat; received[request id] counts the tokens that reached the client."""
    body = {"model": "scout", "messages": [{"role": "user", "content": "Tell me about the herd."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True, "logprobs": True}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                if "id" in event:
                    rid = event["id"].removeprefix("chatcmpl-")
                    choice = event["choices"][0] if event["choices"] else {}
                    received[rid] = received.get(rid, 0) + len((choice.get("logprobs") or {}).get("content") or [])
    except httpx.TransportError:
        pass  # the process went away mid-stream


def test_sigterm_then_sigkill_loses_no_usage_row(tmp_path):
    model = make_tiny(tmp_path / "scout", preset="scout", seed=11)
    db = f"sqlite:///{tmp_path / 'herd.db'}"
    store = TenantStore(connect(db))
    migrate(store.engine)
    store.create_tenant("acme", allowed_models=["scout"])
    key = store.issue_key("acme")[1]
    proc, port = _start(tmp_path, db, model)
    received: dict[str, int] = {}

    async def main():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            streams = [asyncio.create_task(_stream(client, key, received)) for _ in range(STREAMS)]
            assert await until(lambda: len(received) == STREAMS and min(received.values()) >= 3, timeout_s=120), \
                f"the streams never got going: {received}"
            proc.send_signal(signal.SIGTERM)
            killed_at = time.monotonic() + SHUTDOWN_TIMEOUT_S + KILL_MARGIN_S
            await until(lambda: proc.poll() is not None, timeout_s=killed_at - time.monotonic())
            if proc.poll() is None:
                proc.kill()  # whatever it has not written by now is lost, as in a pod past its grace period
            proc.wait(timeout=30)
            await asyncio.gather(*streams)

    try:
        asyncio.run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
    written = {r.request_id: r for r in store.usage_rows("acme")}
    journal = {r["request_id"]: r for r in UsageJournal(tmp_path / "journal.jsonl").recover()}
    assert set(written) | set(journal) == set(received), (sorted(written), sorted(journal), sorted(received))
    for rid, tokens in received.items():
        row = written.get(rid) or journal[rid]
        completion = row.completion_tokens if rid in written else row["completion_tokens"]
        status = row.status if rid in written else row["status"]
        assert completion >= tokens, f"{rid}: the row counts {completion} tokens, the client received {tokens}"
        assert status == "interrupted", (rid, status)
