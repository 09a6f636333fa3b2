"""Speculative decoding through `herd serve` (issue 24's proof): one tiny checkpoint served three times, plain,
with prompt lookup (ngram) and with a tiny EAGLE-3 head; through the official openai client, greedy text and token
counts with speculation equal those without it, chat and completions, whole and streamed, and with the request's
own opt-out; the replica's /metrics counts the tenant's drafts and acceptances; every KV block comes back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herd.model.tiny import make_tiny
from herd.model.tiny_eagle3 import make_tiny_eagle3
from tests.integration.platform.processes import free_port, interrupt, wait_until_serving

MODELS = ("plain", "lookup", "eagle")
SPECULATING = ("lookup", "eagle")
MAX_TOKENS = 32
ENGINE = {"kv_cache_mb": 16, "max_num_seqs": 16, "max_model_len": 512}
DEV_TENANT = "dev"  # the tenant of the key the first start prints (herd.platform.tenancy.setup.DEV_TENANT)

# Copy-heavy prompts first (the text repeats itself, so continuations found in it are worth drafting), then
# ordinary ones.
PROMPTS = (
    "Copy this line exactly: the herd walks to the river, the herd walks to the river, the herd walks to the river",
    "Rewrite without changes: goats eat grass. goats eat grass. goats eat grass. goats eat grass.",
    "a b c d e f g a b c d e f g a b c d e f g a b c d e f g a b c d",
    "def add(x, y):\n    return x + y\n\ndef add(x, y):\n    return x + y\n\ndef add(x, y):\n",
    "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
    "Tell me about the herd.",
    "What do goats dream of?",
    "Summarise: the river was high and the herd waited on the bank until morning.",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `herd serve` for the module: three models on the same tiny Scout, two shards in the trunk's process."""
    root = tmp_path_factory.mktemp("herd")
    scout = make_tiny(root / "scout", preset="scout", seed=24)
    head = make_tiny_eagle3(scout, seed=24)
    speculative = {"plain": None,
                   "lookup": {"method": "ngram", "num_tokens": 4},
                   "eagle": {"method": "eagle3", "num_tokens": 3, "draft_path": str(head)}}
    http_port, ops_port = free_port(), free_port()
    config = root / "herd.json"
    config.write_text(json.dumps({
        "models": [{"name": name, "path": str(scout), "shards": 2, "transport": "local",
                    "engine": {**ENGINE, "speculative": speculative[name]}} for name in MODELS],
        "tenancy": {"admin_token_file": str(root / "admin-token"), "spill_path": str(root / "spill.jsonl")},
        "ops_port": ops_port,
    }))
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--config", str(config),
                             "--http-port", str(http_port), "--grpc-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    output: list[str] = []
    try:
        wait_until_serving(proc, output)
        key = re.search(r"export HERD_KEY=(hk_\w+)", "".join(output)).group(1)
        yield {"http": f"http://127.0.0.1:{http_port}", "ops": f"http://127.0.0.1:{ops_port}", "key": key,
               "output": output}
    finally:
        interrupt(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["http"] + "/v1", api_key=server["key"], max_retries=0, timeout=120)


def _chat(client, model, prompt, **extra):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=MAX_TOKENS, temperature=0, **extra)
    return reply.choices[0].message.content, reply.usage.completion_tokens, reply.choices[0].finish_reason


def _completion(client, model, prompt, **extra):
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **extra)
    return reply.choices[0].text, reply.usage.completion_tokens, reply.choices[0].finish_reason


def _all(client, model, door, **extra):
    """Every prompt through one door of one model, four requests at a time (so they batch in the engine)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda p: door(client, model, p, **extra), PROMPTS))


@pytest.fixture(scope="module")
def plain(client):
    """What the model says without speculation: {door: [(text, completion tokens, finish reason)]}."""
    return {door.__name__: _all(client, "plain", door) for door in (_chat, _completion)}


def _stats(server):
    return httpx.get(server["ops"] + "/herd/stats", timeout=30).json()


def _metrics(server, model) -> dict[tuple[str, tuple], float]:
    """The model's replica /metrics: {(sample name, sorted labels): value}."""
    port = _stats(server)[model]["metrics_port"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _settled(server) -> bool:
    """Every model's replica holds no request and no KV block (within ten seconds)."""
    for _ in range(100):
        stats = _stats(server)
        if all(stats[m]["in_flight"] == 0 and stats[m]["kv_blocks_held"] == 0 for m in MODELS):
            return True
        time.sleep(0.1)
    return False


def test_the_models_are_served_and_plain_decoding_says_something(client, plain):
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)
    for door, replies in plain.items():
        assert all(tokens >= 1 and reason in ("stop", "length") for _, tokens, reason in replies), door
        assert len({text for text, _, _ in replies}) > 1, f"{door}: every prompt gave the same text"


@pytest.mark.parametrize("model", SPECULATING)
def test_speculation_gives_the_plain_text_over_both_doors(client, plain, model):
    for door in (_chat, _completion):
        assert _all(client, model, door) == plain[door.__name__], f"{model} {door.__name__}"


@pytest.mark.parametrize("model", SPECULATING)
def test_speculation_streamed_gives_the_plain_text(client, plain, model):
    for prompt, (text, tokens, reason) in zip(PROMPTS, plain["_chat"], strict=True):
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
        assert chunks[-1].usage.completion_tokens == tokens


@pytest.mark.parametrize("model", SPECULATING)
def test_a_request_that_opts_out_gives_the_plain_text(client, plain, model):
    unspeculated = _all(client, model, _completion, extra_body={"speculative": False})
    assert unspeculated == plain["_completion"]


def test_metrics_count_the_tenants_drafts_and_acceptances(server, client):
    """After the runs above: lookup drafted and had drafts accepted for the dev tenant, and its acceptance-length
    histogram has an observation per choice that verified; plain never drafted."""
    before = _metrics(server, "lookup")
    labels = (("model", "lookup"), ("tenant", DEV_TENANT))
    _all(client, "lookup", _completion)
    after = _metrics(server, "lookup")
    drafted = after[("herd_speculative_draft_tokens_total", labels)]
    accepted = after[("herd_speculative_accepted_tokens_total", labels)]
    assert drafted > 0 and 0 < accepted <= drafted
    assert after[("herd_speculative_acceptance_length_count", labels)] \
        - before.get(("herd_speculative_acceptance_length_count", labels), 0) >= 1
    total = after[("herd_speculative_acceptance_length_sum", labels)]
    assert total >= after[("herd_speculative_acceptance_length_count", labels)], "each length is at least 1"
    eagle = _metrics(server, "eagle")
    assert eagle[("herd_speculative_draft_tokens_total", (("model", "eagle"), ("tenant", DEV_TENANT)))] > 0
    assert not any(name.startswith("herd_speculative_draft_tokens") and value > 0
                   for (name, _), value in _metrics(server, "plain").items())


def test_zz_every_kv_block_comes_back(server):
    assert _settled(server), _stats(server)
