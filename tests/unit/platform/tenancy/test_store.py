"""TenantStore on a migrated SQLite file: tenants, keys (stored only as prefix and hash), authentication,
and the usage ledger's table. Time is injected through `now=` and explicit row times; nothing sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from herd.platform.tenancy.keys import hash_key
from herd.platform.tenancy.store import Conflict, NotFound, TenantStore

T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


def usage_row(request_id: str, *, tenant_id: str = "acme", key_id: str | None = "k1", model: str = "llama",
              time: datetime = T0, prompt: int = 10, completion: int = 5, cached: int = 0) -> dict[str, Any]:
    return {"time": time, "tenant_id": tenant_id, "key_id": key_id, "model": model, "request_id": request_id,
            "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached, "status": "ok",
            "latency_ms": 7}


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they were stored in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


# --- tenants ------------------------------------------------------------------------------------------------------
def test_create_get_update_list_delete_a_tenant(store: TenantStore) -> None:
    made = store.create_tenant("acme", requests_per_min=60, weight=2.5, allowed_models=["llama", "qwen"])
    assert (made.id, made.name, made.requests_per_min, made.weight) == ("acme", "acme", 60, 2.5)

    got = store.get_tenant("acme")
    assert got.allowed_models == ["llama", "qwen"]
    assert (got.weight, got.priority_class, got.disabled, got.sharing_group) == (2.5, "standard", False, None)
    assert got.max_context is None

    store.create_tenant("beta", name="Beta Corp")
    assert store.get_tenant("beta").allowed_models == ["*"]  # every model unless told otherwise
    assert [t.id for t in store.list_tenants()] == ["acme", "beta"]

    store.update_tenant("acme", name="Acme Inc", max_context=4096, sharing_group="g1", disabled=True)
    got = store.get_tenant("acme")
    assert (got.name, got.max_context, got.sharing_group, got.disabled) == ("Acme Inc", 4096, "g1", True)
    assert got.requests_per_min == 60  # untouched fields stay

    store.delete_tenant("acme")
    assert [t.id for t in store.list_tenants()] == ["beta"]
    with pytest.raises(NotFound):
        store.get_tenant("acme")


def test_a_duplicate_tenant_is_a_conflict_and_the_first_stays(store: TenantStore) -> None:
    store.create_tenant("acme", name="first")
    with pytest.raises(Conflict, match="acme"):
        store.create_tenant("acme", name="second")
    assert store.get_tenant("acme").name == "first"
    assert len(store.list_tenants()) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"colour": "red"}, r"unknown tenant fields \['colour'\]"),
        ({"id": "other"}, r"unknown tenant fields \['id'\]"),
        ({"weight": 0}, "weight must be a positive number, got 0"),
        ({"weight": -1.5}, "weight must be a positive number, got -1.5"),
        ({"weight": "2"}, "weight must be a positive number, got '2'"),
        ({"weight": None}, "weight must be a positive number, got None"),
        ({"allowed_models": "llama"}, "allowed_models must be a list of model names, got 'llama'"),
        ({"allowed_models": ["llama", 3]}, "allowed_models must be a list of model names"),
        ({"allowed_models": None}, "allowed_models must be a list of model names, got None"),
    ],
)
def test_bad_fields_are_refused_naming_the_value(store: TenantStore, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.create_tenant("acme", **fields)
    assert store.list_tenants() == []  # nothing half-made

    store.create_tenant("acme", weight=3.0, allowed_models=["llama"])
    with pytest.raises(ValueError, match=message):
        store.update_tenant("acme", **fields)
    kept = store.get_tenant("acme")
    assert (kept.weight, kept.allowed_models) == (3.0, ["llama"])


def test_unknown_tenants_and_keys_are_not_found_by_name(store: TenantStore) -> None:
    for call in (lambda: store.get_tenant("ghost"), lambda: store.update_tenant("ghost", name="x"),
                 lambda: store.delete_tenant("ghost"), lambda: store.issue_key("ghost")):
        with pytest.raises(NotFound, match="no tenant 'ghost'"):
            call()
    for call in (lambda: store.revoke_key("nokey"), lambda: store.rotate_key("nokey")):
        with pytest.raises(NotFound, match="no key 'nokey'"):
            call()
    assert issubclass(NotFound, LookupError)
    assert issubclass(Conflict, ValueError)


# --- keys ---------------------------------------------------------------------------------------------------------
def test_issue_returns_the_plaintext_once_and_stores_only_prefix_and_hash(store: TenantStore, engine: Engine) -> None:
    store.create_tenant("acme")
    key, plaintext = store.issue_key("acme", name="ci")
    _, prefix, secret = plaintext.split("_")
    assert (key.tenant_id, key.prefix, key.name, key.revoked_at) == ("acme", prefix, "ci", None)
    assert key.key_hash == hash_key(plaintext)
    assert plaintext not in repr(vars(key))

    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(text("SELECT * FROM api_keys"))]
        dump = "\n".join(connection.connection.driver_connection.iterdump())  # the whole database, as SQL
    assert len(rows) == 1
    assert rows[0]["prefix"] == prefix
    assert rows[0]["key_hash"] == hash_key(plaintext)
    for column, value in rows[0].items():
        assert plaintext not in str(value), column
        assert secret not in str(value), column
    assert plaintext not in dump and secret not in dump

    listed = store.list_keys("acme")
    assert [k.id for k in listed] == [key.id]
    assert not any(secret in str(v) for v in vars(listed[0]).values())


def test_authenticate_a_good_key_and_record_its_last_use(store: TenantStore) -> None:
    store.create_tenant("acme", allowed_models=["llama"], requests_per_min=5)
    key, plaintext = store.issue_key("acme")
    assert store.list_keys("acme")[0].last_used_at is None

    identity = store.authenticate(plaintext, now=T0)
    assert identity is not None
    assert identity.key_id == key.id
    assert (identity.tenant.id, identity.tenant.allowed_models, identity.tenant.requests_per_min) == (
        "acme", ["llama"], 5)
    assert aware(store.list_keys("acme")[0].last_used_at) == T0

    later = T0 + timedelta(hours=3)
    assert store.authenticate(plaintext, now=later) is not None  # from the cache: its use kept in memory
    assert aware(store.list_keys("acme")[0].last_used_at) == T0
    assert store.flush_last_used() == 1
    assert aware(store.list_keys("acme")[0].last_used_at) == later


def test_authenticate_refuses_unknown_malformed_and_wrong_secret(store: TenantStore) -> None:
    store.create_tenant("acme")
    key, plaintext = store.issue_key("acme")
    _, prefix, secret = plaintext.split("_")
    wrong = "a" if secret[0] != "a" else "b"
    for candidate in ("", "not-a-key", f"hk_{prefix}_", f"hk_zzzzzzzz_{secret}" if prefix != "zzzzzzzz" else "",
                      f"hk_{prefix}_{wrong}{secret[1:]}", f"hk_{prefix}_{secret[::-1]}", plaintext + "x",
                      f"hk_{prefix}_{key.key_hash[:32]}"):
        assert store.authenticate(candidate, now=T0) is None, candidate
    assert store.list_keys("acme")[0].last_used_at is None  # failed attempts mark nothing
    assert store.authenticate(plaintext, now=T0) is not None


def test_a_revoked_key_is_refused_at_once_and_others_still_work(store: TenantStore) -> None:
    store.create_tenant("acme")
    first, first_text = store.issue_key("acme")
    _, second_text = store.issue_key("acme")
    assert store.authenticate(first_text, now=T0) is not None

    revoked = store.revoke_key(first.id)
    assert revoked.revoked_at is not None
    assert store.authenticate(first_text, now=T0) is None
    assert store.authenticate(second_text, now=T0) is not None
    again = store.revoke_key(first.id)  # revoking twice keeps the first moment
    assert aware(again.revoked_at) == aware(revoked.revoked_at)


def test_an_expired_key_is_refused_from_its_expiry_on(store: TenantStore) -> None:
    store.create_tenant("acme")
    expiry = T0 + timedelta(days=30)
    key, plaintext = store.issue_key("acme", expires_at=expiry)
    assert aware(key.expires_at) == expiry
    assert store.authenticate(plaintext, now=expiry - timedelta(seconds=1)) is not None
    assert store.authenticate(plaintext, now=expiry) is None
    assert store.authenticate(plaintext, now=expiry + timedelta(days=1)) is None


def test_a_disabled_tenant_is_refused_until_enabled(store: TenantStore) -> None:
    store.create_tenant("acme")
    _, plaintext = store.issue_key("acme")
    store.update_tenant("acme", disabled=True)
    assert store.authenticate(plaintext, now=T0) is None
    store.update_tenant("acme", disabled=False)
    assert store.authenticate(plaintext, now=T0) is not None


def test_rotate_revokes_the_old_key_and_the_new_one_works(store: TenantStore) -> None:
    store.create_tenant("acme")
    expiry = T0 + timedelta(days=7)
    old, old_text = store.issue_key("acme", name="deploy", expires_at=expiry)
    new, new_text = store.rotate_key(old.id)

    assert new.id != old.id and new_text != old_text and new.prefix != old.prefix
    assert (new.tenant_id, new.name, aware(new.expires_at), new.revoked_at) == ("acme", "deploy", expiry, None)
    assert store.authenticate(old_text, now=T0) is None
    identity = store.authenticate(new_text, now=T0)
    assert identity is not None and identity.key_id == new.id and identity.tenant.id == "acme"
    states = {k.id: k.revoked_at is not None for k in store.list_keys("acme")}
    assert states == {old.id: True, new.id: False}


def test_keys_belong_to_their_tenant(store: TenantStore) -> None:
    store.create_tenant("acme")
    store.create_tenant("beta")
    acme_key, acme_text = store.issue_key("acme")
    beta_key, beta_text = store.issue_key("beta")
    assert [k.id for k in store.list_keys("acme")] == [acme_key.id]
    assert [k.id for k in store.list_keys("beta")] == [beta_key.id]
    assert store.authenticate(acme_text, now=T0).tenant.id == "acme"
    assert store.authenticate(beta_text, now=T0).tenant.id == "beta"


def test_deleting_a_tenant_removes_its_keys(store: TenantStore, engine: Engine) -> None:
    store.create_tenant("acme")
    store.create_tenant("beta")
    store.issue_key("acme")
    _, acme_text = store.issue_key("acme")
    _, beta_text = store.issue_key("beta")

    store.delete_tenant("acme")
    assert store.list_keys("acme") == []
    assert store.authenticate(acme_text, now=T0) is None
    assert store.authenticate(beta_text, now=T0) is not None
    with engine.connect() as connection:
        owners = connection.execute(text("SELECT tenant_id FROM api_keys")).scalars().all()
    assert owners == ["beta"]


# --- usage --------------------------------------------------------------------------------------------------------
def test_record_usage_is_idempotent_by_request_id(store: TenantStore) -> None:
    store.record_usage([usage_row("r1", prompt=10), usage_row("r2", prompt=20)])
    store.record_usage([usage_row("r1", prompt=999), usage_row("r3", prompt=30)])  # a retry and a new row
    store.record_usage([usage_row("r1"), usage_row("r2"), usage_row("r3")])
    store.record_usage([])
    rows = store.usage_rows("acme")
    assert [(r.request_id, r.prompt_tokens) for r in rows] == [("r1", 10), ("r2", 20), ("r3", 30)]


def test_record_usage_keeps_one_row_when_a_batch_repeats_a_request_id(store: TenantStore) -> None:
    """Request ids come from clients (gRPC GenerateRequest.request_id), so one ledger batch can hold two rows
    with the same id; the batch must still be written, with that id counted once."""
    store.record_usage([usage_row("dup", prompt=1), usage_row("other", prompt=2), usage_row("dup", prompt=3)])
    rows = store.usage_rows("acme")
    assert sorted(r.request_id for r in rows) == ["dup", "other"]


def test_usage_rows_keep_every_field(store: TenantStore) -> None:
    store.record_usage([usage_row("r1", prompt=11, completion=22, cached=4)])
    (row,) = store.usage_rows("acme")
    assert (row.tenant_id, row.key_id, row.model, row.status, row.latency_ms) == ("acme", "k1", "llama", "ok", 7)
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (11, 22, 4)
    assert aware(row.time) == T0
    assert store.usage_rows("beta") == []


def usage_fixture(store: TenantStore) -> None:
    day1, day2 = T0, T0 + timedelta(days=1)
    store.record_usage([
        usage_row("a1", time=day1, prompt=10, completion=1, cached=2),
        usage_row("a2", time=day1 + timedelta(hours=11), prompt=20, completion=2, cached=3),  # 23:00, same day
        usage_row("a3", time=day2, prompt=40, completion=4),
        usage_row("a4", time=day1, key_id="k2", prompt=80, completion=8),
        usage_row("a5", time=day1, model="qwen", prompt=160, completion=16),
        usage_row("b1", tenant_id="beta", key_id="kb", time=day1, prompt=1000, completion=100, cached=50),
    ])


def test_usage_sums_by_tenant_key_model_and_day(store: TenantStore) -> None:
    usage_fixture(store)
    got = store.usage()
    assert sorted(got, key=lambda r: (r["day"], r["tenant_id"], r["key_id"], r["model"])) == [
        {"tenant_id": "acme", "key_id": "k1", "model": "llama", "adapter": None, "day": "2025-03-14", "requests": 2,
         "prompt_tokens": 30, "completion_tokens": 3, "cached_tokens": 5},
        {"tenant_id": "acme", "key_id": "k1", "model": "qwen", "adapter": None, "day": "2025-03-14", "requests": 1,
         "prompt_tokens": 160, "completion_tokens": 16, "cached_tokens": 0},
        {"tenant_id": "acme", "key_id": "k2", "model": "llama", "adapter": None, "day": "2025-03-14", "requests": 1,
         "prompt_tokens": 80, "completion_tokens": 8, "cached_tokens": 0},
        {"tenant_id": "beta", "key_id": "kb", "model": "llama", "adapter": None, "day": "2025-03-14", "requests": 1,
         "prompt_tokens": 1000, "completion_tokens": 100, "cached_tokens": 50},
        {"tenant_id": "acme", "key_id": "k1", "model": "llama", "adapter": None, "day": "2025-03-15", "requests": 1,
         "prompt_tokens": 40, "completion_tokens": 4, "cached_tokens": 0},
    ]
    assert [r["day"] for r in got] == sorted(r["day"] for r in got)  # ordered by day


def test_usage_filters_and_never_returns_another_tenants_rows(store: TenantStore) -> None:
    usage_fixture(store)
    acme = store.usage(tenant_id="acme")
    assert {r["tenant_id"] for r in acme} == {"acme"}
    assert sum(r["requests"] for r in acme) == 5
    assert sum(r["prompt_tokens"] for r in acme) == 310
    beta = store.usage(tenant_id="beta")
    assert [(r["key_id"], r["requests"], r["prompt_tokens"]) for r in beta] == [("kb", 1, 1000)]
    assert store.usage(tenant_id="ghost") == []
    assert store.usage(tenant_id="beta", key_id="k1") == []  # another tenant's key id gives nothing

    assert {(r["tenant_id"], r["key_id"]) for r in store.usage(key_id="k2")} == {("acme", "k2")}
    assert {r["model"] for r in store.usage(model="qwen")} == {"qwen"}
    assert store.usage(tenant_id="beta", model="qwen") == []

    day2 = store.usage(day="2025-03-15")
    assert [(r["tenant_id"], r["requests"], r["prompt_tokens"]) for r in day2] == [("acme", 1, 40)]
    day1 = store.usage(tenant_id="acme", key_id="k1", model="llama", day="2025-03-14")
    assert [(r["requests"], r["prompt_tokens"], r["cached_tokens"]) for r in day1] == [(2, 30, 5)]
    assert store.usage(day="2025-03-16") == []


def test_tokens_used_since_counts_prompt_and_completion_of_one_tenant(store: TenantStore) -> None:
    usage_fixture(store)
    assert store.tokens_used_since("acme", T0 - timedelta(days=1)) == 30 + 3 + 40 + 4 + 88 + 176
    assert store.tokens_used_since("acme", T0 + timedelta(hours=1)) == 22 + 44  # 23:00 and the next day
    assert store.tokens_used_since("acme", T0 + timedelta(days=1)) == 44  # `since` itself is included
    assert store.tokens_used_since("acme", T0 + timedelta(days=2)) == 0
    assert store.tokens_used_since("beta", T0) == 1100
    assert store.tokens_used_since("ghost", T0) == 0


def test_the_admin_api_takes_exactly_a_tenants_settable_columns():
    """TENANT_FIELDS comes from the table; the admin API's body model must name the same fields, so a column
    added to Tenant is settable everywhere or this fails."""
    from herd.platform.tenancy.admin_api import TenantFields
    from herd.platform.tenancy.schema import TENANT_FIELDS

    assert list(TenantFields.model_fields) == list(TENANT_FIELDS)


# --- verified keys cached, last uses batched (issue 17 item 16) ----------------------------------------------------
class Statements:
    """Counts the SQL statements an engine runs that start with one of `verbs` and name `table`."""

    def __init__(self, engine: Engine, table: str, *verbs: str) -> None:
        self.seen: list[str] = []

        @event.listens_for(engine, "before_cursor_execute")
        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().upper().startswith(verbs) and table in statement:
                self.seen.append(statement)

    def __len__(self) -> int:
        return len(self.seen)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cached(engine: Engine, clock: Clock) -> TenantStore:
    """A store that trusts a verified key for 5 s of `clock`, and remembers at most 2 keys."""
    return TenantStore(engine, key_cache_ttl_s=5.0, key_cache_size=2, clock=clock)


def test_a_key_used_many_times_within_the_ttl_is_read_once(cached: TenantStore, engine: Engine,
                                                           clock: Clock) -> None:
    cached.create_tenant("acme")
    _, plaintext = cached.issue_key("acme")
    reads, writes = Statements(engine, "api_keys", "SELECT"), Statements(engine, "api_keys", "UPDATE")
    for n in range(50):
        assert cached.authenticate(plaintext, now=T0 + timedelta(seconds=n)) is not None
    assert (len(reads), len(writes)) == (1, 1), "one read and its last-use write; the other 49 asked nothing"
    clock.now += 5.0  # the TTL is over: the database is asked again
    assert cached.authenticate(plaintext, now=T0) is not None
    assert len(reads) == 2


def test_a_revoke_or_tenant_change_through_the_store_is_seen_at_once(cached: TenantStore) -> None:
    cached.create_tenant("acme")
    key, plaintext = cached.issue_key("acme")
    _, other = cached.issue_key("acme")
    assert cached.authenticate(plaintext, now=T0) is not None and cached.authenticate(other, now=T0) is not None
    cached.revoke_key(key.id)
    assert cached.authenticate(plaintext, now=T0) is None
    assert cached.authenticate(other, now=T0) is not None
    cached.update_tenant("acme", disabled=True)
    assert cached.authenticate(other, now=T0) is None
    cached.update_tenant("acme", disabled=False, requests_per_min=7)
    identity = cached.authenticate(other, now=T0)
    assert identity is not None and identity.tenant.requests_per_min == 7
    cached.delete_tenant("acme")
    assert cached.authenticate(other, now=T0) is None


def test_another_processs_revoke_takes_effect_within_the_ttl(cached: TenantStore, engine: Engine,
                                                             clock: Clock) -> None:
    cached.create_tenant("acme")
    key, plaintext = cached.issue_key("acme")
    assert cached.authenticate(plaintext, now=T0) is not None
    TenantStore(engine).revoke_key(key.id)  # `herd tenants key-revoke`, or another gateway's admin API
    assert cached.authenticate(plaintext, now=T0) is not None  # trusted until the TTL runs out
    clock.now += 5.0
    assert cached.authenticate(plaintext, now=T0) is None


def test_an_expired_key_is_refused_even_when_cached(cached: TenantStore) -> None:
    cached.create_tenant("acme")
    _, plaintext = cached.issue_key("acme", expires_at=T0 + timedelta(seconds=1))
    assert cached.authenticate(plaintext, now=T0) is not None
    assert cached.authenticate(plaintext, now=T0 + timedelta(seconds=1)) is None


def test_the_cache_is_keyed_by_hash_and_bounded(cached: TenantStore, engine: Engine) -> None:
    cached.create_tenant("acme")
    plaintexts = [cached.issue_key("acme")[1] for _ in range(3)]
    reads = Statements(engine, "api_keys", "SELECT")
    for plaintext in plaintexts:
        assert cached.authenticate(plaintext, now=T0) is not None
    assert sorted(cached._verified) == sorted(hash_key(p) for p in plaintexts[1:]), "2 at most, least recent gone"
    assert not any(p in repr(cached._verified) for p in plaintexts), "never the plaintext"
    assert cached.authenticate(plaintexts[2], now=T0) is not None and len(reads) == 3
    assert cached.authenticate(plaintexts[0], now=T0) is not None and len(reads) == 4
    wrong = plaintexts[1][:-1] + ("x" if plaintexts[1][-1] != "x" else "y")
    assert cached.authenticate(wrong, now=T0) is None


def test_last_uses_are_written_in_one_batch(cached: TenantStore, engine: Engine) -> None:
    cached.create_tenant("acme")
    keys = [cached.issue_key("acme") for _ in range(2)]
    for n in range(1, 4):
        for _, plaintext in keys:
            assert cached.authenticate(plaintext, now=T0 + timedelta(minutes=n)) is not None
    assert [aware(k.last_used_at) for k in cached.list_keys("acme")] == [T0 + timedelta(minutes=1)] * 2
    updates = Statements(engine, "api_keys", "UPDATE")
    assert cached.flush_last_used() == 2
    assert len(updates) == 1
    assert [aware(k.last_used_at) for k in cached.list_keys("acme")] == [T0 + timedelta(minutes=3)] * 2
    assert cached.flush_last_used() == 0


def test_a_last_use_never_moves_back(cached: TenantStore, clock: Clock) -> None:
    cached.create_tenant("acme")
    _, plaintext = cached.issue_key("acme")
    assert cached.authenticate(plaintext, now=T0) is not None
    assert cached.authenticate(plaintext, now=T0 + timedelta(minutes=1)) is not None  # cached: kept in memory
    clock.now += 5.0
    assert cached.authenticate(plaintext, now=T0 + timedelta(minutes=2)) is not None  # read: written at once
    cached.flush_last_used()  # the older use in memory does not overwrite it
    assert aware(cached.list_keys("acme")[0].last_used_at) == T0 + timedelta(minutes=2)
