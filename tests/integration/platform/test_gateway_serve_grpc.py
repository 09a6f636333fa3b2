"""`herd gateway` as the Helm chart runs it: a process of its own, reaching the model through Ray Serve's
gRPC proxy (application metadata) deployed as serveConfigV2 deploys it; the answer equals the engine's."""

from __future__ import annotations

import base64
import subprocess
import sys
import time

import httpx
import pytest

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model.chat_template import render_chat
from herd.model.tiny import make_tiny
from herd.platform.server import serve_config
from herd.platform.settings import HerdSettings
from tests.images import random_png
from tests.integration.platform.processes import free_port, interrupt

HELLO = [{"role": "user", "content": "through the proxy"}]



def test_herd_gateway_through_serves_grpc_proxy(ray_session, tmp_path):
    from ray import serve

    from herd.workers.serve_app import build_app

    model = make_tiny(tmp_path / "scout", preset="scout", seed=5)
    proxy_port, http_port, ops_port = free_port(), free_port(), free_port()
    settings = HerdSettings.load(models=[{"name": "scout", "path": str(model), "shards": 0,
                                          "serve_grpc_target": f"127.0.0.1:{proxy_port}"}],
                                 tenancy={"auth": False}, http_port=http_port, grpc_port=free_port(),
                                 ops_port=ops_port)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": proxy_port, "grpc_servicer_functions": [
                    "herd.protos.herd.v1.inference_pb2_grpc.add_InferenceServicer_to_server"]})
    config = tmp_path / "gateway.json"
    config.write_text(settings.model_dump_json())
    proc = None
    try:
        (app,) = serve_config(settings)["applications"]  # as the RayService's serveConfigV2 deploys it
        serve.run(build_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"])
        proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "gateway", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("herd gateway did not come up:\n" + (proc.stdout.read() if proc.poll() is not None
                                                                 else "still starting"))
            time.sleep(0.5)
        body = {"model": "scout", "messages": HELLO, "max_tokens": 10, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        engine = LLMEngine.from_pretrained(model, EngineConfig(kv_cache_mb=16))
        prompt = engine.tokenizer.encode(render_chat(HELLO))
        expected = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0]
        assert reply.json()["choices"][0]["message"]["content"] == expected.text
        assert reply.json()["usage"]["completion_tokens"] == len(expected.token_ids)
        picture = "data:image/png;base64," + base64.b64encode(random_png(90, 60)).decode()
        parts = [{"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "through the proxy"}]
        with_image = httpx.post(url + "/v1/chat/completions", timeout=120,
                                json={**body, "messages": [{"role": "user", "content": parts}]})
        assert with_image.status_code == 200, with_image.text
        assert with_image.json()["usage"]["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"] + 147
        truncated = "data:image/png;base64," + base64.b64encode(random_png(64, 64)[:300]).decode()
        parts[0] = {"type": "image_url", "image_url": {"url": truncated}}
        refused = httpx.post(url + "/v1/chat/completions", timeout=120,
                             json={**body, "messages": [{"role": "user", "content": parts}]})
        assert refused.status_code == 400 and "truncated or corrupt" in refused.json()["error"]["message"]
        unknown = httpx.post(url + "/v1/chat/completions", json={**body, "model": "nope"}, timeout=30)
        assert unknown.status_code == 404
        load = httpx.get(f"http://127.0.0.1:{ops_port}/herd/load", timeout=30).json()
        assert load["scout"]["in_flight"] == 0
    finally:
        if proc is not None:
            interrupt(proc, timeout_s=60)
        serve.shutdown()
