"""A replica's side of prefill/decode disaggregation: the prompt's KV handed from a prefill to a decode replica.

A prefill replica runs a request's prompt alone (herd.workers.prefill_request: one greedy token, thrown away),
exports the prompt's KV blocks from its prefix cache (herd.engine.kv_export) and puts them on the KV transport; a
decode replica takes them, imports them into its prefix cache and runs the original request, which finds its
prompt's blocks there and samples its first token itself: the output, the seed's draws and the usage are those of
a colocated replica. Exports and imports run on the engine's thread between two steps. A decode replica that cannot
take or import an export (gone, of another layout) counts it and computes the prompt itself: slower, never wrong.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, fields

from herd.engine.errors import Code, HerdError
from herd.engine.kv_export import KVExport
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.kv_transport import KVTransport, Prefilled
from herd.workers.prefill_request import colocated_reason, prefill_request
from herd.workers.prefix_affinity import cache_salt
from herd.workers.replica_core import ReplicaCore

log = logging.getLogger(__name__)


@dataclass
class KVMoves:
    """What a replica moved of prompts' KV since it started."""

    prefills: int = 0
    """Prefill side: prompts run and exported, and the exports' bytes."""
    exported_bytes: int = 0
    imports: int = 0
    """Decode side: exports imported before their request ran, and the exports' bytes."""
    imported_bytes: int = 0
    import_failures: int = 0
    """Exports that could not be taken or imported: their requests computed their prompts themselves."""


class KVHandoff:
    """Prefill and decode over one replica's core and a KV transport."""

    def __init__(self, core: ReplicaCore, transport: KVTransport) -> None:
        self.core = core
        self.transport = transport
        self.moves = KVMoves()

    async def prefill(self, request: pb.GenerateRequest) -> Prefilled:
        """Run the request's prompt, export its blocks, put them on the transport; with the prompt tokens the run
        found in this replica's prefix cache (what the request's usage reports as cached)."""
        if reason := colocated_reason(request):
            raise HerdError(Code.INVALID_ARGUMENT, f"a request with {reason} is not prefilled apart")
        cached = 0
        async for chunk in self.core.generate(prefill_request(request)):
            cached = chunk.usage.cached_tokens if chunk.HasField("usage") else cached
        ids, salt = list(request.token_ids.ids), cache_salt(request.tenant)
        export = await self.core.engine.run_between_steps(lambda engine: engine.export_prefix(ids, salt))
        self.moves.prefills += 1
        self.moves.exported_bytes += export.nbytes
        return Prefilled(handle=await self.transport.put(export), blocks=export.num_blocks, nbytes=export.nbytes,
                         cached_tokens=cached)

    async def generate(self, request: pb.GenerateRequest, prefilled: Prefilled | None,
                       ) -> AsyncGenerator[pb.GenerateChunk, None]:
        """Import the prefilled export (none: a colocated request), then the request's chunks as the core streams
        them, reporting the prefill replica's cached tokens where the import took."""
        imported = prefilled is not None and await self._import(prefilled)
        async for chunk in self.core.generate(request):
            if imported and chunk.HasField("usage"):
                assert prefilled is not None
                chunk.usage.cached_tokens = prefilled.cached_tokens
            yield chunk

    def stats(self) -> dict[str, int]:
        engine = self.core.engine.engine.stats()
        return {**{f"kv_{f.name}": getattr(self.moves, f.name) for f in fields(self.moves)},
                "kv_exported_blocks": engine.kv_exported_blocks, "kv_imported_blocks": engine.kv_imported_blocks,
                "prefix_hit_tokens": engine.prefix_hit_tokens}

    async def _import(self, prefilled: Prefilled) -> bool:
        try:
            export: KVExport = await self.transport.take(prefilled.handle)
            await self.core.engine.run_between_steps(lambda engine: engine.import_prefix(export))
        except Exception as err:  # the request goes on without it: exact, only slower
            self.moves.import_failures += 1
            log.warning("replica of %s: no KV import (%s: %s); computing the prompt here", self.core.config.name,
                        type(err).__name__, err)
            return False
        self.moves.imports += 1
        self.moves.imported_bytes += export.nbytes
        return True


__all__ = ["KVHandoff", "KVMoves"]
