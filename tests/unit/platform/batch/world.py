"""A tenancy database, a guarded gateway over a backend, and the Files and Batch APIs over both (SQLite, a
temporary file directory): what herd serve wires, in this process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.platform.batch.file_store import LocalFileStore
from herd.platform.batch.runner import BatchRunner, RunnerSettings
from herd.platform.batch.service import Batches, BatchLimits
from herd.platform.batch.store import BatchStore
from herd.platform.gateway.core import Gateway
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import Identity, TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb


class Recording:
    """A backend that passes every request on and keeps what the engine was asked (tenant class, request id)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.tokenizer, self.image_prompts = inner, inner.name, inner.tokenizer, \
            inner.image_prompts
        self.requests: list[pb.GenerateRequest] = []

    def card(self) -> pb.ModelCard:
        return self.inner.card()

    def generate(self, request: pb.GenerateRequest) -> Any:
        self.requests.append(request)
        return self.inner.generate(request)

    async def stats(self) -> Any:
        return await self.inner.stats()

    async def healthy(self) -> bool:
        return True

    async def ready_replicas(self) -> int:
        return 1


@dataclass
class World:
    url: str
    store: TenantStore
    ledger: UsageLedger
    gateway: Gateway
    backend: Recording
    batch_store: BatchStore
    files: LocalFileStore
    batches: Batches
    keys: dict[str, str]

    def runner(self, store: BatchStore | None = None, **settings: Any) -> BatchRunner:
        runner = BatchRunner(store or self.batch_store, self.files, self.gateway, self.identity,
                             settings=RunnerSettings(**{"poll_interval_s": 0.05, **settings}))
        self.batches.on_change = runner.wake
        return runner

    def identity(self, tenant_id: str) -> Identity:
        return Identity(tenant=self.store.get_tenant(tenant_id), key_id=None)


def make_world(tmp_path: Path, backend: Any, *, limits: BatchLimits | None = None) -> World:
    url = f"sqlite:///{tmp_path / 'herd.db'}"
    store = TenantStore(connect(url))
    migrate(store.engine)
    ledger = UsageLedger(store, flush_interval_s=0.05)
    recording = Recording(backend)
    gateway = Gateway({"scout": recording}, guard=Guard(store, InProcessRateLimiter(), ledger))
    keys = {}
    for tenant in ("acme", "umbrella"):
        store.create_tenant(tenant, allowed_models=["*"])
        keys[tenant] = store.issue_key(tenant)[1]
    batch_store = BatchStore(store.engine)
    files = LocalFileStore(tmp_path / "files")
    return World(url, store, ledger, gateway, recording, batch_store, files,
                 Batches(batch_store, files, limits=limits), keys)


def chat_lines(count: int, *, max_tokens: int = 4, url: str = "/v1/chat/completions") -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": url,
        "body": {"model": "scout", "messages": [{"role": "user", "content": f"Count to {i}."}],
                 "max_tokens": max_tokens, "temperature": 0}}).encode() + b"\n" for i in range(count))
