"""Per-tenant LoRA adapters through `herd serve` (issue 26's proof): adapters registered and granted through the
admin API (`herd tenants --url ...`), two tenants each with its own adapter, through the official openai client:
at temperature 0 each tenant's adapter says something else than the other's and the base model's, /v1/models
lists only the tenant's own adapters, another tenant's adapter is a 404, a mismatched adapter is refused at
registration, and the usage ledger records the adapter."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from herd.cli import main
from herd.model.config import load_config
from herd.model.tiny import make_tiny
from herd.model.tiny_lora import make_tiny_lora
from tests.integration.platform.processes import herd_serve
from tests.waiting import wait_until

TARGETS = ("attention", "shared_expert", "experts")
"""The adapters cover attention, the shared expert and the routed experts (which run on the two expert shards)."""
PROMPT = "Tell me about the herd and the river."
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `herd serve` of the tiny Scout with LoRA on (2 slots), its experts on two shards, and three adapters
    made for it (one of rank 16 for a model that takes at most rank 8)."""
    root = tmp_path_factory.mktemp("herd")
    path = make_tiny(root / "scout", preset="scout", seed=26)
    text = load_config(path).text
    adapters = {name: make_tiny_lora(root / name, text, rank=8, targets=TARGETS, seed=seed, strength=1.0)
                for name, seed in (("support", 1), ("legal", 2))}
    adapters["wide"] = make_tiny_lora(root / "wide", text, rank=16, targets=("attention",), seed=3)
    settings = {
        "models": [{"name": "scout", "path": str(path), "shards": 2,
                    "engine": {"kv_cache_mb": 16, "max_num_seqs": 8, "max_model_len": 512, "max_loras": 2,
                               "max_lora_rank": 8}}],
        "tenancy": {"admin_token_file": str(root / "admin-token"), "spill_path": str(root / "spill.jsonl")},
    }
    with herd_serve(root, settings) as served:
        yield {**served, "token_file": root / "admin-token", "adapters": adapters}


def _herd_tenants(server, capsys, *args):
    code = main(["tenants", "--url", server["ops"], "--admin-token-file", str(server["token_file"]), *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


@pytest.fixture(scope="module")
def tenants(server):
    """Tenants acme (granted scout:support) and beta (granted scout:legal), a key each, through the admin API."""
    admin = httpx.Client(base_url=server["ops"] + "/admin/v1", timeout=60,
                         headers={"authorization": f"Bearer {server['token_file'].read_text().strip()}"})
    keys = {}
    for tenant in ("acme", "beta"):
        assert admin.post("/tenants", json={"id": tenant}).status_code == 201
        keys[tenant] = admin.post(f"/tenants/{tenant}/keys", json={}).json()["key"]
    for name, tenant in (("support", "acme"), ("legal", "beta")):
        made = admin.post("/adapters", json={"model": "scout", "name": name, "path": str(server["adapters"][name])})
        assert made.status_code == 201, made.text
        assert made.json()["rank"] == 8 and "feed_forward.experts.gate_up_proj" in made.json()["targets"]
        granted = admin.post(f"/adapters/scout/{name}/grants", json={"tenant_id": tenant})
        assert granted.json()["tenants"] == [tenant]
    return {tenant: openai.OpenAI(base_url=server["http"] + "/v1", api_key=key, max_retries=0, timeout=120)
            for tenant, key in keys.items()}


def _say(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert reply.model == model and reply.usage.completion_tokens > 0
    return reply.choices[0].message.content


def test_each_tenant_sees_its_own_adapter_and_not_the_others(tenants):
    assert sorted(m.id for m in tenants["acme"].models.list().data) == ["scout", "scout:support"]
    assert sorted(m.id for m in tenants["beta"].models.list().data) == ["scout", "scout:legal"]
    for tenant, other in (("acme", "scout:legal"), ("beta", "scout:support")):
        with pytest.raises(openai.NotFoundError) as refused:  # as if it did not exist: nothing about who has it
            _say(tenants[tenant], other)
        assert "/" not in refused.value.message  # no adapter path
    with pytest.raises(openai.NotFoundError):
        _say(tenants["acme"], "scout:nothing")


def test_two_tenants_adapters_answer_differently_at_temperature_0(tenants):
    base = _say(tenants["acme"], "scout")
    support, legal = _say(tenants["acme"], "scout:support"), _say(tenants["beta"], "scout:legal")
    assert len({base, support, legal}) == 3, (base, support, legal)
    assert _say(tenants["acme"], "scout:support") == support  # greedy: the same again (its KV now cached)
    assert _say(tenants["beta"], "scout") == base  # the base model is the base model for every tenant
    streamed = tenants["beta"].chat.completions.create(
        model="scout:legal", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0,
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == legal


def test_the_ledger_records_the_adapter(server, tenants, capsys):
    _say(tenants["beta"], "scout:legal")

    seen: list[dict] = []

    def recorded():
        code, rows, _ = _herd_tenants(server, capsys, "usage", "--tenant", "beta")
        seen[:] = rows if code == 0 else []
        return any(r["adapter"] == "legal" for r in seen)

    assert wait_until(recorded, timeout_s=30, interval_s=0.5), seen
    assert {r["adapter"] for r in seen} <= {"legal", None} and all(r["model"] == "scout" for r in seen)


def test_registration_refuses_what_cannot_run_and_revokes_take_effect(server, tenants, capsys):
    code, _, err = _herd_tenants(server, capsys, "adapter-register", "scout", "wide", str(server["adapters"]["wide"]))
    assert code == 2 and "rank 16" in err and "max_rank 8" in err
    code, _, err = _herd_tenants(server, capsys, "adapter-register", "scout", "ghost", str(server["adapters"]["wide"]
                                                                                           .parent / "absent"))
    assert code == 2 and "400" in err
    code, _, err = _herd_tenants(server, capsys, "adapter-register", "llama", "x", str(server["adapters"]["support"]))
    assert code == 2 and "404" in err
    code, listed, _ = _herd_tenants(server, capsys, "adapters")
    assert code == 0 and [(a["id"], a["tenants"]) for a in listed] == [("scout:legal", ["beta"]),
                                                                       ("scout:support", ["acme"])]
    code, revoked, _ = _herd_tenants(server, capsys, "adapter-revoke", "scout", "support", "acme")
    assert code == 0 and revoked["tenants"] == []
    with pytest.raises(openai.NotFoundError):
        _say(tenants["acme"], "scout:support")
    assert [m.id for m in tenants["acme"].models.list().data] == ["scout"]
