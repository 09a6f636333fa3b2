"""The gateway's doors in a process of their own, without Ray: serve_doors over the tiny Scout in this
process (LocalBackend), for tests that signal and kill it (python -m tests.integration.platform.doors_process
SETTINGS_JSON MODEL_PATH PACE_S).

Each token is held PACE_S before it is passed on, so a stream lasts as long as a test needs it to whatever
the machine's speed (the shutdown test needs streams that outlive the shutdown budget).
"""

from __future__ import annotations

import asyncio
import json
import sys

from herd.engine import EngineConfig
from herd.platform.gateway.backend import LocalBackend
from herd.platform.server import serve_doors
from herd.platform.settings import HerdSettings
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore


class Paced:
    """A backend whose tokens come no faster than one per `pace_s` (a chunk of n tokens waits n times that)."""

    def __init__(self, inner, pace_s: float):
        self.inner, self.pace_s = inner, pace_s
        self.name, self.tokenizer, self.image_prompts = inner.name, inner.tokenizer, inner.image_prompts

    def card(self):
        return self.inner.card()

    async def generate(self, request):
        async for chunk in self.inner.generate(request):
            await asyncio.sleep(self.pace_s * max(1, len(chunk.token_ids)))
            yield chunk

    async def stats(self):
        return await self.inner.stats()

    async def healthy(self):
        return await self.inner.healthy()

    async def ready_replicas(self):
        return await self.inner.ready_replicas()


def main() -> None:
    settings = HerdSettings(**json.loads(sys.argv[1]))
    config = ReplicaConfig(name="scout", path=sys.argv[2], shards=2, transport="local",
                           engine=EngineConfig(kv_cache_mb=16, max_num_seqs=16, max_model_len=512))
    backend = Paced(LocalBackend(ReplicaCore(config)), float(sys.argv[3]))
    asyncio.run(serve_doors(settings, {"scout": backend}, lambda _gateway: None))


if __name__ == "__main__":
    main()
