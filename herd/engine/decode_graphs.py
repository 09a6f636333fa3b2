"""Pure-decode steps on static shapes: padded to a few batch sizes, on persistent buffers, replayable as CUDA graphs.

Legend: G decoding sequences in the step, Gb its batch bucket (the smallest decode batch size >= G), W blocks of
a decode's key window, Wb the step's key-length bucket for a layer group (its widest window rounded up to a power
of two), B tokens per block, V vocab.

A step whose every chunk is one token that samples runs here instead of the eager path (herd.engine.paged_attention
for any step). Everything its forward reads lives in one int64 device buffer per bucket (Gb, Wb of each group),
written with copy_ before each run and never re-allocated: the ids, positions, every row's write slot, key count
and window blocks. The slots and mask attention reads are computed from those inside the forward, so a CUDA graph
captured once per bucket replays any later step of that bucket. Rows G..Gb-1 are padding: token 0 at position 0,
writing to and reading only slot 0 of the cache's scratch block (herd.engine.paged_kv), which no sequence holds;
a real row's window is padded with the scratch block too, behind its mask. Rows are independent through the
model (attention per row, the MoE per token), so the real rows' logits are the eager path's up to float rounding.

Graphs (CUDA only, behind EngineConfig.cuda_graphs): captured lazily on a bucket's first step, after warm-up runs on
a side stream, into one private memory pool, at most `max_graphs` of them (later buckets run eagerly on their
buffers). A capture that fails (a host sync inside the forward, a kernel launched off torch's current stream) is
logged once and every step then runs the same padded forward eagerly: slower, never wrong.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch

from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.paged_attention import GroupPlan, PagedAttention, decode_slots
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.model.llama4 import Llama4Model

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)

WARMUP_RUNS = 2
"""Eager runs on a side stream before a capture (lazy initialisations, autotuning, the allocator's first blocks)."""

BucketKey = tuple[int, tuple[int, ...]]
"""(Gb, the Wb of each layer group in the cache manager's order)."""


def is_pure_decode(chunks: Sequence[ScheduledChunk]) -> bool:
    """Every chunk is one token that samples, and none is an image placeholder (the padded path has no images)."""
    return bool(chunks) and all(
        c.num_tokens == 1 and c.samples and (c.seq.images is None or c.start >= len(c.seq.prompt_ids)) for c in chunks
    )


def token_at(chunk: ScheduledChunk) -> int:
    """The known token at the chunk's one position, without joining prompt and output."""
    prompt = chunk.seq.prompt_ids
    return prompt[chunk.start] if chunk.start < len(prompt) else chunk.seq.output_ids[chunk.start - len(prompt)]


def key_bucket(width: int) -> int:
    """Blocks of a key window rounded up to a power of two (so a few graphs cover every context length)."""
    return 1 << max(0, width - 1).bit_length()


class StaticInputs:
    """One bucket's persistent device buffers, views of one packed int64 tensor (one host-to-device copy a step):
    ids [Gb], positions [Gb], and per group write slots [Gb], key counts [Gb], window blocks [Gb, Wb]."""

    def __init__(self, rows: int, widths: dict[str, int], device: torch.device) -> None:
        self.rows = rows
        sizes = [rows, rows, *(n for w in widths.values() for n in (rows, rows, rows * w))]
        self.packed = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        parts = iter(torch.split(self.packed, sizes))
        self.ids, self.positions = next(parts), next(parts)
        self.groups = {g: (next(parts), next(parts), next(parts).view(rows, w)) for g, w in widths.items()}

    def plans(self, block: int) -> dict[str, GroupPlan]:
        """Each group's attention plan, computed on the device from the buffers (inside a captured graph)."""
        rows = torch.arange(self.rows, device=self.packed.device)
        plans = {}
        for group, (write, lengths, blocks) in self.groups.items():
            slots, mask = decode_slots(blocks, lengths, block)
            plans[group] = GroupPlan(write_slots=write, decode_rows=rows, decode_slots=slots, decode_mask=mask,
                                     prefills=[])
        return plans


class StaticDecode:
    """Runs pure-decode steps of up to max(batch_sizes) sequences padded to their bucket; see the module."""

    def __init__(self, model: Llama4Model, kv: KVCacheManager, cache: PagedKVCache, *, batch_sizes: Sequence[int],
                 graphs: bool, max_graphs: int) -> None:
        if graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a cuda device, it is on {model.device}")
        self.model, self.kv, self.cache = model, kv, cache
        self.batch_sizes = tuple(batch_sizes)
        self.graphs, self.max_graphs = graphs, max_graphs
        self.inputs: dict[BucketKey, StaticInputs] = {}
        self.captured: dict[BucketKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # graph, its logits [Gb, V]
        self.capture_failed = False
        self._pool: _POOL_HANDLE | None = None

    def takes(self, chunks: Sequence[ScheduledChunk]) -> bool:
        return len(chunks) <= self.batch_sizes[-1] and is_pure_decode(chunks)

    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """float32 logits [G, V] of a pure-decode step (takes(chunks) holds)."""
        return self.prepare(chunks)()

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> Callable[[], torch.Tensor]:
        """Pack the step's inputs now (tokens and block tables are read here); the call returned copies them into
        the bucket's buffers and runs or replays it."""
        key, host = self._pack(chunks)
        return functools.partial(self._run, key, host, len(chunks))

    @torch.inference_mode()
    def _run(self, key: BucketKey, host: torch.Tensor, count: int) -> torch.Tensor:
        inputs = self.inputs.get(key)
        if inputs is None:
            widths = dict(zip(self.kv.pools, key[1], strict=True))
            inputs = self.inputs[key] = StaticInputs(key[0], widths, self.model.device)
        if inputs.packed.is_cuda:  # pinned, so the copy queues behind earlier work instead of waiting for it
            host = host.pin_memory()  # a fresh block: the host allocator keeps it until the copy is done
        inputs.packed.copy_(host, non_blocking=True)
        graph = self._graph(key, inputs) if self.graphs else None
        if graph is None:
            return self._forward(inputs)[:count]
        graph[0].replay()
        return graph[1][:count].clone()  # the graph's output is overwritten by its next replay

    def _forward(self, inputs: StaticInputs) -> torch.Tensor:
        context = PagedAttention(self.cache, inputs.plans(self.kv.block_size))
        # The ids are valid by construction (the engine checked prompts; sampled ids are in the vocabulary) and
        # already on the device, where checking them would be a host sync, which no captured graph can hold.
        logits: torch.Tensor = self.model(inputs.ids, inputs.positions, context, check_ids=False)  # [Gb, V]
        return logits.float()

    def _pack(self, chunks: Sequence[ScheduledChunk]) -> tuple[BucketKey, torch.Tensor]:
        """The bucket of the step and every buffer's values, padded, as one host tensor in StaticInputs' order."""
        count = len(chunks)
        rows = self.batch_sizes[bisect.bisect_left(self.batch_sizes, count)]
        pad = rows - count
        positions = [c.start for c in chunks]
        values = [token_at(c) for c in chunks] + [0] * pad + positions + [0] * pad
        block = self.kv.block_size
        widths = []
        for group in self.kv.pools:
            scratch = self.cache.scratch_block[group]
            write, lengths, windows = [], [], []
            for chunk, p in zip(chunks, positions, strict=True):
                table = cast("list[int]", self.kv.table(chunk.seq, group))
                window = self.kv.window_start(group, p)
                write.append(table[p // block] * block + p % block)
                lengths.append(p + 1 - window)
                windows.append(table[window // block : p // block + 1])
            width = key_bucket(max(map(len, windows)))
            widths.append(width)
            values += write
            values += [scratch * block] * pad
            values += lengths
            values += [1] * pad
            for blocks in windows:
                values += blocks
                values += [scratch] * (width - len(blocks))
            values += [scratch] * (width * pad)
        return (rows, tuple(widths)), torch.tensor(values, dtype=torch.long)

    def _graph(self, key: BucketKey, inputs: StaticInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The bucket's graph: captured now if new, there is room and no capture has failed; else None."""
        if key in self.captured:
            return self.captured[key]
        if self.capture_failed or len(self.captured) >= self.max_graphs:
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            self.captured[key] = capture(lambda: self._forward(inputs), self.model.device, self._pool)
        except Exception as err:  # any failure means this forward cannot be replayed: run it eagerly instead
            self.capture_failed = True
            log.warning("CUDA graph capture of a decode step (bucket %s) failed, so decode steps run the padded "
                        "path eagerly from now on: %s", key, err)
            return None
        return self.captured[key]


def capture(forward: Callable[[], torch.Tensor], device: torch.device,
            pool: _POOL_HANDLE) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `forward` up on a side stream, then capture it into `pool`: (the graph, its output tensor).

    The warm-up runs compute the current step for real (they write the same keys and values the replay will)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # bare in torch
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            forward()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA calls (a server's) neither break this capture nor are refused by it.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = forward()
    return graph, out
