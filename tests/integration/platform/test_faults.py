"""Faults under load, through herd serve: an expert shard and then a whole replica are killed (SIGKILL)
while 32 streams run, then a shard three times in a row under 8 streamed HTTP chats (each a 200 with the
undisturbed text). No request fails and every stream ends with the tokens of an undisturbed run (issue 27): the
replica restarts a killed shard in place and holds its requests meanwhile (requests sent during the recovery are
held too, not refused), and the gateway sends each stream of a killed replica to the restarted one, continued
from the tokens already streamed. Nothing hangs, no KV block is left held, no shard process is left over, and
every request has exactly one usage row."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import grpc
import httpx
import pytest

from herd.model.tiny import make_tiny
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.store import TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.platform.processes import descendants, free_port, interrupt, wait_until_serving
from tests.waiting import until

RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
STREAMS = 32
DEADLINE_S = 90.0


def _kill_one(root: int, title: str) -> int:
    pids = [pid for pid, t in descendants(root).items() if t.startswith(f"ray::{title}")]
    assert pids, f"no process titled ray::{title} under {root}: {sorted(descendants(root).values())}"
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


async def _chat(http: str, key: str, n: int, under_way: set[int]) -> tuple[int, str]:
    """One streamed chat completion over HTTP: its status and text (in `under_way` from its first chunk on)."""
    body = {"model": "scout", "messages": [{"role": "user", "content": f"chat {n}"}], "max_tokens": 80,
            "temperature": 0, "ignore_eos": True, "stream": True}
    text = []
    try:
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client, client.stream(
                "POST", http + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: "):])
                    text += [c["delta"].get("content") or "" for c in event["choices"]]
                    under_way.add(n)
                elif line.startswith("data: [DONE]"):
                    text.append("[DONE]")
            return reply.status_code, "".join(text)
    finally:
        under_way.add(n)


async def _chats(http: str, key: str, kill, streams: int = 8) -> list[tuple[int, str]]:
    """`streams` chats, `kill` once all have begun, then one more chat sent at once (during the recovery)."""
    under_way: set[int] = set()
    tasks = [asyncio.create_task(_chat(http, key, n, under_way)) for n in range(streams)]
    assert await until(lambda: len(under_way) == streams, timeout_s=DEADLINE_S), "the chats never got going"
    await asyncio.to_thread(kill)
    tasks.append(asyncio.create_task(_chat(http, key, streams, under_way)))
    return list(await asyncio.gather(*tasks))


async def _one(stub, key: str, n: int, under_way: set[int]) -> tuple[str, object]:
    """One stream: ("ok", its token ids) or ("retriable", code) or ("bad", what); in `under_way` from its first
    chunk on."""
    request = pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content=f"fault {n}")],
                             sampling=pb.SamplingOptions(max_tokens=120, temperature=0, ignore_eos=True))
    tokens: list[int] = []
    try:
        async for chunk in stub.Chat(request, timeout=DEADLINE_S, metadata=(("authorization", f"Bearer {key}"),)):
            tokens += chunk.token_ids
            under_way.add(n)
    except grpc.aio.AioRpcError as err:
        if err.code() in RETRIABLE and err.details():
            return "retriable", err.code()
        return "bad", f"{err.code()}: {err.details()}"
    finally:
        under_way.add(n)  # or over
    return ("ok", tokens) if len(tokens) == 120 else ("bad", f"{len(tokens)} tokens")


async def _load(grpc_url: str, key: str, kill, streams: int = STREAMS) -> tuple[list[tuple[str, object]], float]:
    async with grpc.aio.insecure_channel(grpc_url) as channel:
        stub = pb_grpc.InferenceStub(channel)
        start = time.monotonic()
        under_way: set[int] = set()
        tasks = [asyncio.create_task(_one(stub, key, n, under_way)) for n in range(streams)]
        assert await until(lambda: len(under_way) == streams, timeout_s=DEADLINE_S), "the streams never got going"
        await asyncio.to_thread(kill)
        results = await asyncio.gather(*tasks)
        return results, time.monotonic() - start


def _until_serving_again(http: str, key: str, timeout_s: float = 240) -> int:
    """Send a request every second until one completes; returns how many were refused meanwhile."""
    body = {"model": "scout", "messages": [{"role": "user", "content": "back?"}], "max_tokens": 4, "temperature": 0}
    refused, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = httpx.post(http + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                           timeout=60)
        if reply.status_code == 200:
            return refused
        assert reply.status_code in (429, 503, 504), reply.text  # retriable while the part comes back
        refused += 1
        time.sleep(1)
    raise AssertionError("the model never served again")


def _blocks_held(ops: str) -> int:
    stats = httpx.get(ops + "/herd/stats", timeout=30).json()["scout"]
    return stats["kv_blocks_held"]


def _replica_metrics(ops: str) -> str:
    port = httpx.get(ops + "/herd/stats", timeout=30).json()["scout"]["metrics_port"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text


def _shard_processes(root: int) -> int:
    return sum(title.startswith("ray::ExpertShardActor") for title in descendants(root).values())


@pytest.mark.parametrize("transport", ["grpc", "collective"])
def test_killing_a_shard_then_a_replica_under_load_loses_nothing(tmp_path, transport):
    model = make_tiny(tmp_path / "scout", preset="scout", seed=31)
    http_port, grpc_port, ops_port = free_port(), free_port(), free_port()
    database = tmp_path / ".herd" / "herd.db"  # the embedded default (cwd is tmp_path): herd serve makes tenant dev
    config = tmp_path / "herd.json"
    config.write_text(json.dumps({
        "models": [{"name": "scout", "path": str(model), "shards": 2, "transport": transport, "dispatch_timeout_s": 5,
                    "deployment": {"health_check_period_s": 2, "max_ongoing_requests": 64},
                    # a shard's restart is process start and imports (seconds; far more on a loaded machine)
                    "engine": {"max_num_seqs": 64, "fault_hold_s": DEADLINE_S - 10}}],
        "tenancy": {"admin_token_file": str(tmp_path / "admin"), "spill_path": str(tmp_path / "spill.jsonl")},
        "ops_port": ops_port,
    }))
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--config", str(config),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    output: list[str] = []
    http, grpc_url = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    sent = 0
    try:
        wait_until_serving(proc, output)
        key = re.search(r"export HERD_KEY=(hk_\w+)", "".join(output)).group(1)
        ops = f"http://127.0.0.1:{ops_port}"
        report, loads = {}, {}
        for title in ("ExpertShardActor", "ServeReplica:scout"):
            results, seconds = asyncio.run(_load(grpc_url, key, lambda t=title: _kill_one(proc.pid, t)))
            loads[title] = results
            sent += STREAMS
            outcomes = Counter(kind for kind, _ in results)
            # A shard is restarted in place, the replica holding its steps; a replica's streams are continued on
            # the restarted one.
            assert outcomes == {"ok": STREAMS}, results
            assert seconds < DEADLINE_S + 10, "within the deadline: nothing hung"
            refused = _until_serving_again(http, key)
            sent += refused + 1
            assert _blocks_held(ops) == 0, "every KV block came back"
            if title == "ExpertShardActor":
                assert refused == 0, "a request sent while the shard came back was held, not refused"
            report[title] = (dict(outcomes), refused, round(seconds, 1))
        # A shard killed three times in a row, each while 8 chats stream over HTTP (once it is back), a ninth sent
        # just after the kill: every chat is a 200 with the undisturbed text, and nothing leaks.
        undisturbed = asyncio.run(_chats(http, key, lambda: None))
        sent += 9
        assert all(status == 200 and text.endswith("[DONE]") for status, text in undisturbed), undisturbed
        for _ in range(3):
            chats = asyncio.run(_chats(http, key, lambda: _kill_one(proc.pid, "ExpertShardActor")))
            sent += 9
            assert chats == undisturbed, "the 8 chats, and the one sent during the recovery (held, not refused)"
            assert _until_serving_again(http, key) == 0, "held, not refused, while the shard came back"
            sent += 1
        assert _blocks_held(ops) == 0, "every KV block came back"
        assert _shard_processes(proc.pid) == 2, "the killed shards' processes are gone, one process per shard"
        metrics = _replica_metrics(ops)
        restarts = re.search(r'herd_replica_shard_restarts_total\{model="scout"\} (\S+)', metrics)
        assert restarts and float(restarts.group(1)) == 3, "the replica's shard restarts since it was restarted"
        assert re.search(r'herd_replica_shard_recovery_seconds_count\{model="scout"\} 3', metrics)
        # And it serves a full load again.
        results, _ = asyncio.run(_load(grpc_url, key, lambda: None))
        sent += STREAMS
        assert [kind for kind, _ in results] == ["ok"] * STREAMS, results
        for title in ("ExpertShardActor", "ServeReplica:scout"):
            assert [tokens for _, tokens in loads[title]] == [tokens for _, tokens in results], "as if undisturbed"
        metrics = httpx.get(f"{ops}/metrics", timeout=30).text
        assert re.search(r'herd_migrated_requests_total\{model="scout"\} [1-9]', metrics), "counted as migrated"
    finally:
        interrupt(proc)
    print(report)
    rows = sqlite3.connect(database).execute("select request_id, status from usage").fetchall()
    assert len(rows) == len({r[0] for r in rows}) == sent, f"{len(rows)} rows for {sent} requests"
    statuses = Counter(status for _, status in rows)
    assert statuses["ok"] == sent - sum(v for s, v in statuses.items() if s != "ok")
    assert set(statuses) <= {"ok", "unavailable", "deadline_exceeded", "refused:RESOURCE_EXHAUSTED"}, statuses


def test_killing_the_gateway_under_load_frees_the_replica_and_its_usage_comes_back(ray_session, tmp_path):
    """`herd gateway` (the Helm chart's gateway pod) is SIGKILLed with 32 streams in flight: the clients get
    UNAVAILABLE at once, the replica aborts their requests (Serve's proxy sees the connection go), and the
    gateway started again writes a row for every request from its usage journal, the cut ones marked
    interrupted."""
    from ray import serve

    from herd.platform.server import serve_config
    from herd.platform.settings import HerdSettings
    from herd.workers.serve_app import build_app

    model = make_tiny(tmp_path / "scout", preset="scout", seed=33)
    proxy_port, http_port, grpc_port = free_port(), free_port(), free_port()
    database = tmp_path / "herd.db"
    settings = HerdSettings.load(
        models=[{"name": "scout", "path": str(model), "shards": 0, "serve_grpc_target": f"127.0.0.1:{proxy_port}",
                 "engine": {"max_num_seqs": 64}, "deployment": {"max_ongoing_requests": 64}}],
        tenancy={"database_url": f"sqlite:///{database}", "admin_token_file": str(tmp_path / "admin"),
                 "spill_path": str(tmp_path / "journal.jsonl"), "usage_flush_interval_s": 0.2},
        http_port=http_port, grpc_port=grpc_port, ops_port=free_port())
    config = tmp_path / "gateway.json"
    config.write_text(settings.model_dump_json())
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": proxy_port, "grpc_servicer_functions": [
                    "herd.protos.herd.v1.inference_pb2_grpc.add_InferenceServicer_to_server"]})

    def gateway() -> tuple[subprocess.Popen, list[str]]:
        proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "gateway", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        output: list[str] = []
        wait_until_serving(proc, output, timeout_s=120)
        return proc, output

    first = second = None
    try:
        (app,) = serve_config(settings)["applications"]
        serve.run(build_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"])
        replica = serve.get_app_handle("scout")
        store = TenantStore(connect(f"sqlite:///{database}"))  # herd gateway makes no tenant of its own
        migrate(store.engine)
        store.create_tenant("acme", allowed_models=["*"])
        key = store.issue_key("acme")[1]
        first, _ = gateway()
        results, seconds = asyncio.run(_load(f"127.0.0.1:{grpc_port}", key, lambda: first.kill()))
        assert [kind for kind, _ in results] == ["retriable"] * STREAMS, results
        assert {code for _, code in results} == {grpc.StatusCode.UNAVAILABLE}
        assert seconds < DEADLINE_S, "the clients learnt at once, nothing hung"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = replica.stats.remote().result()
            if stats["in_flight"] == 0 and not stats["kv_blocks_held"]:
                break
            time.sleep(0.5)
        assert stats["in_flight"] == 0, f"the replica still serves the dead gateway's requests: {stats}"

        second, _ = gateway()  # as Kubernetes restarts the pod
        assert [t.id for t in store.list_tenants()] == ["acme"], "a gateway on a configured database makes no tenant"
        assert _until_serving_again(f"http://127.0.0.1:{http_port}", key) == 0
    finally:
        for proc in (first, second):
            if proc is not None:
                interrupt(proc, timeout_s=60)
        serve.shutdown()
    rows = sqlite3.connect(database).execute("select request_id, status, completion_tokens from usage").fetchall()
    statuses = Counter(status for _, status, _ in rows)
    assert len(rows) == len({r[0] for r in rows}) == STREAMS + 1, rows
    assert statuses == {"interrupted": STREAMS, "ok": 1}, statuses
    assert all(tokens == 0 for _, status, tokens in rows if status == "interrupted")
