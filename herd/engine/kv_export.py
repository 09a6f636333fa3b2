"""A prompt's KV blocks taken out of one engine and put into another: prefill/decode disaggregation's payload.

Legend: n blocks of a group exported, h blocks in the exported chain, B tokens per block, and after the block
dimension the rest of each cache tensor's shape (B, K kv heads, D head dim; an FP8 cache's scales: B, K).

As in vLLM's disaggregated prefill, a prefill engine runs the prompt (one token, discarded), exports the prompt's
blocks, and a decode engine imports them into its prefix cache before it runs the original request, which takes
them as it would any prefix hit: it samples its first token itself and computes the rest, so the output is the one
a colocated engine gives. What is exported is what the importer's admission takes for that prompt
(KVCacheManager.admit): the hash chain over the prompt less its last token (a prefix hit always leaves one token to
compute); of it every global block and, of the chunked layers, only the blocks of the chunk the chain ends in,
stopping at the first block the exporter lacks. The prompt's last partial block (under B tokens) is never exported:
the decode side recomputes it, with the last token, as after any prefix hit.

An export carries its tokens and salt, not keys to trust: the importer hashes the chain itself, so a block lands
only under the key its tokens and tenant give (the prefix cache's own isolation). It carries the exporter's layout
(model config, dtype, block size, each cache layer's tensors' block shapes and dtypes) so that an engine of another
model or cache refuses it with a ValueError instead of attending over wrong numbers. Tensors are CPU torch tensors
holding whole blocks as the cache stores them. Pure data and copies; the bookkeeping is the KV cache manager's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from herd.engine.host_kv_tier import HostKVTier
from herd.engine.kv_cache_manager import BlockPlace, ImportPlan
from herd.engine.paged_kv import PagedKVCache
from herd.engine.prefix_hash import block_hashes
from herd.model.config import TextConfig

TensorLayout = tuple[tuple[int, ...], str]
"""One cache tensor of a layer: its block shape (after the block dimension) and dtype."""


@dataclass(frozen=True)
class KVExportLayout:
    """What an importer must share with the exporter for the blocks to mean the same."""

    model: str
    """SHA-256 of the model's text config (layers, heads, chunk size, RoPE: everything the KV depends on)."""
    dtype: str
    """The model's compute dtype (an FP8 cache's contents depend on it too)."""
    block_size: int
    cache_layers: tuple[tuple[str, tuple[TensorLayout, ...]], ...]
    """Per cache layer (a draft head's too): its group and its tensors."""

    @classmethod
    def of(cls, config: TextConfig, dtype: torch.dtype, cache: PagedKVCache) -> KVExportLayout:
        layers = tuple((group, tuple((tuple(t.shape[1:]), str(t.dtype)) for t in cache.layer_tensors(layer)))
                       for layer, group in enumerate(cache.groups))
        digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
        return cls(model=digest, dtype=str(dtype), block_size=cache.block_size, cache_layers=layers)

    def check(self, importer: KVExportLayout) -> None:
        """ValueError naming the first way the importer's layout differs from this (the exporter's)."""
        pairs: list[tuple[str, object, object]] = [
            ("model config (sha256)", self.model[:16], importer.model[:16]),
            ("model dtype", self.dtype, importer.dtype),
            ("block_size", self.block_size, importer.block_size),
            ("cache layers", len(self.cache_layers), len(importer.cache_layers)),
            *((f"cache layer {i} (group, tensors' block shapes and dtypes: the KV cache dtype)", ours, theirs)
              for i, (ours, theirs) in enumerate(zip(self.cache_layers, importer.cache_layers, strict=False))),
        ]
        for name, ours, theirs in pairs:
            if ours != theirs:
                raise ValueError(f"a KV export of another layout: {name} is {ours} in the export, {theirs} here")


@dataclass(frozen=True, kw_only=True)
class KVExport:
    """The KV blocks of one prompt's prefix, picklable (Ray's object store carries it between replicas)."""

    layout: KVExportLayout
    salt: str
    """The cache salt of the requests that may take the blocks (herd.engine.prefix_hash.cache_salt)."""
    token_ids: tuple[int, ...]
    """The chain's tokens: h * B."""
    tensors: tuple[tuple[torch.Tensor, ...], ...]
    """Per cache layer, per tensor of it: [n, *block shape] on the CPU, the blocks of the layer's group's needed range
    (KVCacheManager.needed_range for h) in chain order."""

    @property
    def num_blocks(self) -> int:
        """h: blocks in the chain (the global group's count; the chunked group holds those of the last chunk)."""
        return len(self.token_ids) // self.layout.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for tensors in self.tensors for t in tensors)

    def keys_for(self, importer: KVExportLayout, blocks: dict[str, int]) -> list[bytes]:
        """The chain's keys, hashed here, after checking that the importer's layout is the exporter's and that each
        group holds the `blocks` the importer's admission would take (ValueError otherwise)."""
        self.layout.check(importer)
        if len(self.token_ids) % self.layout.block_size:
            raise ValueError(f"a KV export holds whole blocks: {len(self.token_ids)} tokens is not a multiple of "
                             f"block_size {self.layout.block_size}")
        for layer, ((group, _), tensors) in enumerate(zip(self.layout.cache_layers, self.tensors, strict=True)):
            if any(t.shape[0] != blocks[group] for t in tensors):
                raise ValueError(f"a KV export's layer {layer} holds {tensors[0].shape[0]} blocks; a chain of "
                                 f"{self.num_blocks} takes {blocks[group]} {group} blocks here")
        return block_hashes(self.token_ids, self.layout.block_size, self.salt)


def gather(cache: PagedKVCache, host: HostKVTier | None, places: dict[str, list[BlockPlace]],
           ) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Per cache layer, its tensors' blocks at its group's `places` (device blocks or host slots), on the CPU."""
    device = cache.layer_tensors(0)[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the host tier's copies are asynchronous
    layers = []
    for layer, group in enumerate(cache.groups):
        where = places[group]
        on_device = [(i, block) for i, (here, block) in enumerate(where) if here]
        on_host = [(i, slot) for i, (here, slot) in enumerate(where) if not here]
        tensors = []
        for index, tensor in enumerate(cache.layer_tensors(layer)):
            out = torch.empty(len(where), *tensor.shape[1:], dtype=tensor.dtype)  # [n, *block shape]
            if on_device:
                rows = torch.tensor([b for _, b in on_device], device=device)
                out[[i for i, _ in on_device]] = tensor.index_select(0, rows).cpu()
            if on_host:
                assert host is not None
                out[[i for i, _ in on_host]] = host.host[layer][index][[s for _, s in on_host]]
            tensors.append(out)
        layers.append(tuple(tensors))
    return tuple(layers)


def scatter(cache: PagedKVCache, plan: ImportPlan, export: KVExport) -> None:
    """Write the export's blocks that the plan gave fresh device blocks into those blocks, in every layer."""
    for layer, group in enumerate(cache.groups):
        fresh = plan.fresh[group]
        if not fresh:
            continue
        tensors = cache.layer_tensors(layer)
        rows = torch.tensor([i for i, _ in fresh])  # [f] into the export's blocks
        blocks = torch.tensor([b for _, b in fresh], device=tensors[0].device)  # [f]
        for tensor, data in zip(tensors, export.tensors[layer], strict=True):
            tensor.index_copy_(0, blocks, data.index_select(0, rows).to(tensor.device))


__all__ = ["KVExport", "KVExportLayout", "gather", "scatter"]
