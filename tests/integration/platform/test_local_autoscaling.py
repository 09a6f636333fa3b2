"""Under herd serve, the control plane scales a model up under a burst, down when it is quiet, and to zero
when it is idle; a request for the model at zero is held until a replica is back. No request fails on the
way (Serve drains a replica before it goes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx

from herd.model.tiny import make_tiny
from tests.integration.platform.processes import free_port, interrupt, wait_until_serving


def test_burst_up_quiet_down_idle_to_zero_and_back_with_nothing_failed(tmp_path):
    model = make_tiny(tmp_path / "scout", preset="scout", seed=21)
    port, ops_port = free_port(), free_port()
    config = tmp_path / "herd.json"
    config.write_text(json.dumps({
        "models": [{"name": "scout", "path": str(model), "shards": 0, "drain_timeout_s": 60,
                    "cold_start_wait_s": 120,
                    "autoscale": {"min_replicas": 0, "max_replicas": 2, "target_requests_per_replica": 4,
                                  "scale_down_window_s": 6, "idle_to_zero_s": 8, "ttft_slo_s": None}}],
        "controlplane": {"enabled": True, "interval_s": 1},
        "tenancy": {"auth": False},
        "ops_port": ops_port,
    }))
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--config", str(config),
                             "--http-port", str(port), "--grpc-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, ops = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ops_port}"
    output: list[str] = []
    history: list[dict] = []  # what /herd/controlplane said, in order

    def log() -> str:
        return "".join(output[-60:]) + "\ncontrol plane:\n" + "\n".join(map(str, history[-20:]))

    try:
        wait_until_serving(proc, output)

        def scout() -> dict:
            state = httpx.get(ops + "/herd/controlplane", timeout=30).json()
            history.append({**state["replicas"]["scout"], "reason": state["decisions"].get("scout", {}).get("reason")})
            return state["replicas"]["scout"]

        async def request(client, tokens):
            body = {"model": "scout", "messages": [{"role": "user", "content": "scale me"}], "max_tokens": tokens,
                    "ignore_eos": True, "temperature": 0}
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            return reply.json()["usage"]["completion_tokens"]

        async def until(condition, what, timeout_s=120, trickle=None):
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                stop = time.monotonic() + timeout_s
                while time.monotonic() < stop:
                    if condition(await asyncio.to_thread(scout)):
                        return
                    if trickle:
                        assert await request(client, trickle) == trickle  # requests succeed meanwhile
                    await asyncio.sleep(0.5)
            raise AssertionError(f"never {what}:\n{log()}")

        async def burst():
            """Keeps 16 long requests in flight (a finished one is replaced) until the second replica is ready, so a
            fast machine cannot finish the burst before the scale-up lands; returns every request's token count."""
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                tasks: list[asyncio.Task] = []
                stop = time.monotonic() + 180
                while time.monotonic() < stop:
                    running = sum(not task.done() for task in tasks)
                    tasks += [asyncio.create_task(request(client, 400)) for _ in range(16 - running)]
                    if (await asyncio.to_thread(scout))["ready"] == 2:
                        return await asyncio.gather(*tasks)
                    await asyncio.sleep(0.5)
                await asyncio.gather(*tasks)
                raise AssertionError(f"never two replicas ready during the burst:\n{log()}")

        assert scout()["target"] == 1
        counts = asyncio.run(burst())
        assert len(counts) >= 16 and set(counts) == {400}
        asyncio.run(until(lambda s: s["target"] == 1 and s["ready"] == 1, "back to one replica", trickle=5))
        asyncio.run(until(lambda s: s["target"] == 0 and s["ready"] == 0, "scaled to zero when idle"))

        async def wake():
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                return await request(client, 5)

        assert asyncio.run(wake()) == 5, "held until a replica came back, then served"
        assert scout()["target"] == 1
        metrics = httpx.get(ops + "/metrics", timeout=30).text
        assert 'herd_controlplane_decisions_total{direction="up",model="scout"}' in metrics
        assert 'herd_controlplane_target_replicas{model="scout"} 1.0' in metrics
    finally:
        interrupt(proc)
