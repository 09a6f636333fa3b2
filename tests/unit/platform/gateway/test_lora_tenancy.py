"""Per-tenant LoRA adapters at the HTTP door over an in-process replica: registration checked against the model
(every refusal at registration, none at request time), grants by tenant, `<model>:<adapter>` routed with the
adapter (404 for a tenant not granted it), /v1/models per tenant, the ledger's adapter column, and the replica
loading each registration once and dropping unused ones past max_cpu_loras."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from herd.engine import EngineConfig
from herd.model.config import load_config
from herd.model.tiny import make_tiny
from herd.model.tiny_lora import make_tiny_lora
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.grpc_server import start_grpc
from herd.platform.gateway.http_app import create_app
from herd.platform.tenancy.adapter_check import AdapterModel, model_checker
from herd.platform.tenancy.adapter_registry import AdapterRegistry
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import Conflict, NotFound, TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore

TARGETS = ("attention", "shared_expert", "experts")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny Scout served with LoRA on (2 slots, at most 3 registered, rank <= 8) and adapters for it."""
    root = tmp_path_factory.mktemp("lora")
    path = make_tiny(root / "scout", preset="scout", seed=26)
    text = load_config(path).text
    adapters = {name: make_tiny_lora(root / name, text, rank=4, targets=TARGETS, seed=seed, strength=1.0)
                for name, seed in (("a1", 1), ("a2", 2), ("a3", 3), ("a4", 4))}
    other = load_config(make_tiny(root / "maverick", preset="maverick", seed=1)).text
    adapters["wide"] = make_tiny_lora(root / "wide", text, rank=16, targets=("attention",))
    adapters["alien"] = make_tiny_lora(root / "alien", other, rank=4, targets=("dense_mlp",))
    engine = EngineConfig(kv_cache_mb=8, max_num_seqs=8, max_model_len=256, max_loras=2, max_lora_rank=8,
                          max_cpu_loras=3)
    core = ReplicaCore(ReplicaConfig(name="scout", path=str(path), shards=0, engine=engine))
    return path, adapters, core


@pytest.fixture
def world(tmp_path, made):
    path, adapters, core = made
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    models = {"scout": AdapterModel(path, 2, 8), "plain": AdapterModel(path, 0, 8)}
    registry = AdapterRegistry(store, model_checker(models))
    ledger = UsageLedger(store, flush_interval_s=0.05)
    gateway = Gateway({"scout": LocalBackend(core)}, guard=Guard(store, InProcessRateLimiter(), ledger))
    keys = {}
    for tenant in ("acme", "beta"):
        store.create_tenant(tenant)
        keys[tenant] = store.issue_key(tenant)[1]
    return store, registry, ledger, gateway, keys, adapters, core


def _chat(client, key, model):
    return client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": model, "messages": [{"role": "user", "content": "Tell me about the herd."}],
                             "max_tokens": 8, "temperature": 0})


def test_registration_refuses_what_cannot_run_on_the_model(world):
    _, registry, _, _, _, adapters, _ = world
    refusals = {
        "rank 16 is over this bank's max_rank 8": ("scout", "w", adapters["wide"]),
        "no such module to adapt": ("scout", "x", adapters["alien"]),
        "no adapter_config.json": ("scout", "y", adapters["a1"].parent / "absent"),
        "serves no LoRA adapters": ("plain", "z", adapters["a1"]),
        "an adapter name": ("scout", "bad:name", adapters["a1"]),
    }
    for message, (model, name, path) in refusals.items():
        with pytest.raises(ValueError, match=message):
            registry.register(model, name, str(path))
    with pytest.raises(NotFound, match="no model 'llama'"):
        registry.register("llama", "a", str(adapters["a1"]))
    registry.register("scout", "a1", str(adapters["a1"]))
    with pytest.raises(Conflict):
        registry.register("scout", "a1", str(adapters["a2"]))
    assert [(a.name, tenants) for a, tenants in registry.list_adapters()] == [("a1", [])]


def test_tenants_use_only_their_adapters_and_the_ledger_names_them(world):
    store, registry, ledger, gateway, keys, adapters, _ = world
    for name, tenant in (("a1", "acme"), ("a2", "beta")):
        registry.register("scout", name, str(adapters[name]))
        registry.grant("scout", name, tenant)

    async def main():
        ledger.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)),
                                     base_url="http://herd") as client:
            listed = {t: (await client.get("/v1/models", headers={"authorization": f"Bearer {keys[t]}"})).json()
                      for t in keys}
            replies = {(t, m): await _chat(client, keys[t], m) for t, m in (
                ("acme", "scout"), ("acme", "scout:a1"), ("beta", "scout:a2"), ("acme", "scout:a2"),
                ("beta", "scout:a1"), ("beta", "scout:nothing"))}
        await ledger.close()
        return listed, replies

    listed, replies = asyncio.run(main())
    assert [(m["id"], m.get("parent")) for m in listed["acme"]["data"]] == [("scout", None), ("scout:a1", "scout")]
    assert [m["id"] for m in listed["beta"]["data"]] == ["scout", "scout:a2"]
    for refused in (("acme", "scout:a2"), ("beta", "scout:a1"), ("beta", "scout:nothing")):
        assert replies[refused].status_code == 404, refused
        assert "a2" not in replies[refused].json()["error"]["message"].replace(refused[1], "")
    texts = {k: r.json()["choices"][0]["message"]["content"] for k, r in replies.items() if r.status_code == 200}
    assert len(set(texts.values())) == 3, texts  # base, a1 and a2 answer differently at temperature 0
    assert replies[("acme", "scout:a1")].json()["model"] == "scout:a1"
    rows = sorted((r.tenant_id, r.model, r.adapter or "") for t in keys for r in store.usage_rows(t))
    assert rows == [("acme", "scout", ""), ("acme", "scout", "a1"), ("beta", "scout", "a2")]


def test_the_replica_loads_each_registration_once_and_drops_unused_ones(world):
    _, registry, _, gateway, keys, adapters, core = world
    for name in ("a1", "a2", "a3", "a4"):
        registry.register("scout", name, str(adapters[name]))
        registry.grant("scout", name, "acme")
    before = set(core.adapters.registered())

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)),
                                     base_url="http://herd") as client:
            together = await asyncio.gather(*(_chat(client, keys["acme"], "scout:a1") for _ in range(3)))
            later = [await _chat(client, keys["acme"], f"scout:{n}") for n in ("a2", "a3", "a4")]
            return together, later

    together, later = asyncio.run(main())
    assert [r.status_code for r in together + later] == [200] * 6
    assert len({r.json()["choices"][0]["message"]["content"] for r in together}) == 1
    now = [n for n in core.adapters.registered() if n not in before]
    assert len(core.adapters.registered()) == 3  # max_cpu_loras: the least recently used went
    assert [n.split("@")[0] for n in now] == ["a2", "a3", "a4"]
    assert sorted(core.engine.engine.adapters()) == sorted(core.adapters.registered())
    stats = core.engine.engine.stats()
    assert stats.lora_adapters_resident == 2 and stats.lora_adapter_evictions >= 2


def test_the_grpc_door_serves_and_hides_adapters_the_same_way(world):
    _, registry, _, gateway, keys, adapters, _ = world
    registry.register("scout", "a1", str(adapters["a1"]))
    registry.grant("scout", "a1", "acme")

    async def main():
        server, port = await start_grpc(gateway, port=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                listed = {t: await stub.ListModels(pb.ListModelsRequest(), metadata=_bearer(keys[t])) for t in keys}
                said = {}
                for tenant, model in (("acme", "scout"), ("acme", "scout:a1"), ("beta", "scout:a1")):
                    request = pb.GenerateRequest(model=model, text="Tell me about the herd.",
                                                 sampling=pb.SamplingOptions(max_tokens=6, temperature=0),
                                                 adapter=pb.LoraAdapter(name="x@1", path="/etc"))  # replaced
                    try:
                        said[tenant, model] = "".join([c.text async for c in stub.Generate(
                            request, metadata=_bearer(keys[tenant]))])
                    except grpc.aio.AioRpcError as err:
                        said[tenant, model] = err.code()
                return listed, said
        finally:
            await server.stop(0)

    listed, said = asyncio.run(main())
    assert [(m.id, m.parent) for m in listed["acme"].models] == [("scout", ""), ("scout:a1", "scout")]
    assert [m.id for m in listed["beta"].models] == ["scout"]
    assert said["beta", "scout:a1"] == grpc.StatusCode.NOT_FOUND
    assert isinstance(said["acme", "scout:a1"], str) and said["acme", "scout:a1"] != said["acme", "scout"]


def _bearer(key):
    return (("authorization", f"Bearer {key}"),)
