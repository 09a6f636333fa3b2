"""Speculative decoding through `herd serve` (issue 24's proof): each tiny checkpoint (Scout, Maverick) served three
times, plain, with prompt lookup (ngram) and with a tiny EAGLE-3 head; through the official openai client, greedy
text and token counts with speculation equal those without it, chat and completions, whole and streamed, and with
the request's own opt-out; the replica's /metrics counts each tenant's drafts and acceptances; every KV block comes
back."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herd.model.tiny import make_tiny
from herd.model.tiny_eagle3 import make_tiny_eagle3
from tests.integration.platform.processes import herd_serve

PRESETS = ("scout", "maverick")
METHODS = {"plain": None, "lookup": {"method": "ngram", "num_tokens": 4},
           "eagle": {"method": "eagle3", "num_tokens": 3}}
"""Each checkpoint served three ways: the speculative section of the engine settings (eagle's draft_path added)."""
PREFIX = {"scout": "", "maverick": "maverick-"}
"""Served model names: plain, lookup and eagle on the tiny Scout; maverick-plain, ... on the tiny Maverick."""
MODELS = tuple(PREFIX[preset] + method for preset in PRESETS for method in METHODS)
SPECULATING = tuple(m for m in MODELS if not m.endswith("plain"))
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
    """One `herd serve` for the module: three models on each tiny checkpoint (the same weights served plain,
    with prompt lookup and with the checkpoint's EAGLE-3 head), two shards in the trunk's process."""
    root = tmp_path_factory.mktemp("herd")
    models = []
    for preset in PRESETS:
        path = make_tiny(root / preset, preset=preset, seed=24)
        head = make_tiny_eagle3(path, seed=24)
        for method, speculative in METHODS.items():
            if speculative is not None and speculative["method"] == "eagle3":
                speculative = {**speculative, "draft_path": str(head)}
            models.append({"name": PREFIX[preset] + method, "path": str(path), "shards": 2, "transport": "local",
                           "engine": {**ENGINE, "speculative": speculative}})
    settings = {
        "models": models,
        "tenancy": {"admin_token_file": str(root / "admin-token"), "spill_path": str(root / "spill.jsonl")},
    }
    with herd_serve(root, settings) as served:
        key = re.search(r"export HERD_KEY=(hk_\w+)", "".join(served["output"])).group(1)
        yield {**served, "key": key, "admin": (root / "admin-token").read_text().strip()}


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
    """What each checkpoint says without speculation: {model served: {door: [(text, completion tokens,
    finish reason)]}}, for the plain model and those speculating on the same checkpoint."""
    said = {}
    for preset in PRESETS:
        replies = {door.__name__: _all(client, PREFIX[preset] + "plain", door) for door in (_chat, _completion)}
        said |= {PREFIX[preset] + method: replies for method in METHODS}
    return said


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
    for model in ("plain", "maverick-plain"):
        for door, replies in plain[model].items():
            assert all(tokens >= 1 and reason in ("stop", "length") for _, tokens, reason in replies), (model, door)
            assert len({text for text, _, _ in replies}) > 1, f"{model} {door}: every prompt gave the same text"


@pytest.mark.parametrize("model", SPECULATING)
def test_speculation_gives_the_plain_text_over_both_doors(client, plain, model):
    for door in (_chat, _completion):
        assert _all(client, model, door) == plain[model][door.__name__], f"{model} {door.__name__}"


@pytest.mark.parametrize("model", SPECULATING)
def test_speculation_streamed_gives_the_plain_text(client, plain, model):
    for prompt, (text, tokens, reason) in zip(PROMPTS, plain[model]["_chat"], strict=True):
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
        assert chunks[-1].usage.completion_tokens == tokens


@pytest.mark.parametrize("model", SPECULATING)
def test_a_request_that_opts_out_gives_the_plain_text_and_drafts_nothing(server, client, plain, model):
    drafted = ("herd_speculative_draft_tokens_total", (("model", model), ("tenant", DEV_TENANT)))
    before = _metrics(server, model).get(drafted, 0)
    unspeculated = _all(client, model, _completion, extra_body={"speculative": False})
    assert unspeculated == plain[model]["_completion"]
    assert _metrics(server, model).get(drafted, 0) == before, "nothing was drafted for requests that opted out"


@pytest.mark.parametrize("preset", PRESETS)
def test_metrics_count_the_tenants_drafts_and_acceptances(server, client, preset):
    """Prompt lookup drafts and has drafts accepted for the dev tenant, and its acceptance-length histogram has an
    observation per choice that verified; the EAGLE-3 head drafted too; the plain model never drafted."""
    lookup, eagle, plain_model = (PREFIX[preset] + method for method in ("lookup", "eagle", "plain"))
    labels = (("model", lookup), ("tenant", DEV_TENANT))
    lengths = ("herd_speculative_acceptance_length_count", labels)
    before = _metrics(server, lookup)
    _all(client, lookup, _completion)
    after = _metrics(server, lookup)
    drafted = after[("herd_speculative_draft_tokens_total", labels)]
    accepted = after[("herd_speculative_accepted_tokens_total", labels)]
    assert drafted > 0 and 0 < accepted <= drafted
    assert after[lengths] - before.get(lengths, 0) >= 1
    assert after[("herd_speculative_acceptance_length_sum", labels)] >= after[lengths], "each length is at least 1"
    assert after[("herd_speculative_acceptance_length_bucket", (("le", "1.0"), *labels))] < after[lengths], \
        "some choice had drafts accepted"
    drafted_by_head = _metrics(server, eagle)[("herd_speculative_draft_tokens_total",
                                               (("model", eagle), ("tenant", DEV_TENANT)))]
    assert drafted_by_head > 0
    assert not any(name.startswith("herd_speculative_draft_tokens") and value > 0
                   for (name, _), value in _metrics(server, plain_model).items())


def _tenant_key(server, tenant: str) -> str:
    """A key of a new tenant allowed every model (the admin API on the ops port)."""
    headers = {"authorization": f"Bearer {server['admin']}"}
    made = httpx.post(server["ops"] + "/admin/v1/tenants", json={"id": tenant, "allowed_models": ["*"]},
                      headers=headers, timeout=30)
    assert made.status_code == 201, made.text
    return httpx.post(server["ops"] + f"/admin/v1/tenants/{tenant}/keys", json={"name": "t"}, headers=headers,
                      timeout=30).json()["key"]


@pytest.mark.parametrize("preset", PRESETS)
def test_an_answer_that_repeats_itself_is_mostly_accepted_and_counted_for_its_tenant(server, plain, preset):
    """An answer the logit bias holds to one token: prompt lookup drafts it from the output so far and the model
    accepts every draft, several per step; the text is plain decoding's (whole and streamed, both methods), and the
    drafts are counted under this tenant, not the dev tenant."""
    tenant = f"copyist-{preset}"
    client = openai.OpenAI(base_url=server["http"] + "/v1", api_key=_tenant_key(server, tenant), max_retries=0,
                           timeout=120)
    lookup = PREFIX[preset] + "lookup"
    request = {"prompt": "the herd", "max_tokens": MAX_TOKENS, "temperature": 0, "logit_bias": {"77": 100},
               "extra_body": {"ignore_eos": True}}
    before = _metrics(server, lookup)
    said = {m: client.completions.create(model=PREFIX[preset] + m, **request).choices[0].text for m in METHODS}
    streamed = {m: [c.choices[0].text for c in client.completions.create(model=PREFIX[preset] + m, stream=True,
                                                                           **request) if c.choices]
                for m in ("plain", "lookup")}
    after = _metrics(server, lookup)
    assert said["lookup"] == said["eagle"] == said["plain"] == "".join(streamed["lookup"]) == "".join(streamed["plain"])
    mine = (("model", lookup), ("tenant", tenant))
    accepted = after[("herd_speculative_accepted_tokens_total", mine)]
    drafted = after[("herd_speculative_draft_tokens_total", mine)]
    # Per request: one token from the prompt's step, one or two decoded before "77 77" recurs, then drafts of k = 4
    # (fewer near max_tokens), all accepted, each step making 5: about 24 of the 32 tokens were drafts.
    assert accepted == drafted and accepted >= MAX_TOKENS, (drafted, accepted)
    assert after[("herd_speculative_acceptance_length_bucket", (("le", "2.5"), *mine))] \
        < after[("herd_speculative_acceptance_length_count", mine)], "an acceptance length above 2.5"
    dev = (("model", lookup), ("tenant", DEV_TENANT))
    assert after[("herd_speculative_accepted_tokens_total", dev)] \
        == before[("herd_speculative_accepted_tokens_total", dev)], "the dev tenant's count did not move"


def test_zz_every_kv_block_comes_back(server):
    assert _settled(server), _stats(server)
