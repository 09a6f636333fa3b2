"""Runs one scheduled step: a mixed batch of prefill chunks and decodes, through the model's own forward.

Legend: N tokens in the step, C chunks (one per scheduled sequence), V vocab, M image tokens in the step,
P prompt rows scored for prompt logprobs, R rows sampled (one per sampling chunk, plus one per draft token
verified), A auxiliary layers, H hidden.

The runner only lays the step out: every chunk's tokens and positions end to end, the rows that take
image features (a chunk boundary may fall inside an image, so features are placed chunk by chunk), the
rows whose logits are sampled, and the step's view of the paged KV cache (herd.engine.paged_attention).
The arithmetic is the model's. A chunk verifying draft tokens (speculative decoding) ends with them and has
a sampled row at each of its last 1 + len(drafts) positions. The chunks of requests asking for prompt logprobs
have their prompt rows' logits computed by the same forward, after the sampled rows, and scored at once
(herd.engine.prompt_logprobs).

With EngineConfig.micro_batches > 1 a step of several chunks is split into runs of chunks (herd.engine.micro_batching)
that the model computes as ping-pong micro-batches (herd.model.micro_batch), each with its own view of the paged
cache, images and prompt rows; a runner returning a draft head's aux layers runs whole steps.

A pure-decode step (every chunk one token that samples) takes the static path instead when the engine config
says so (EngineConfig.use_static_decode): padded to a batch bucket on persistent buffers, replayed as a CUDA graph
where graphs are on (herd.engine.decode_graphs). The logits returned are the same either way.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from herd.engine import prompt_logprobs
from herd.engine.config import EngineConfig
from herd.engine.context_parallel import ContextParallel
from herd.engine.decode_graphs import StaticDecode, token_at
from herd.engine.host_kv_tier import HostKVTier
from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.micro_batching import split_chunks
from herd.engine.paged_attention import PagedAttention
from herd.engine.paged_kv import PagedKVCache
from herd.engine.prompt_logprobs import ScoredPrompt
from herd.engine.scheduler import ScheduledChunk
from herd.model.llama4 import Llama4Model
from herd.model.micro_batch import MicroBatch


@dataclass(frozen=True)
class StepLogits:
    """What a step's forward gives: the sampling chunks' logits, and the prompt tokens it scored."""

    sampled: torch.Tensor
    """float32 [R, V], for the chunks that sample, in order: one row each, 1 + len(drafts) for a chunk verifying
    drafts (its last known token's and every draft's)."""
    prompt: list[ScoredPrompt] = field(default_factory=list)
    aux_hidden: torch.Tensor | None = None
    """[N, A*H]: the hidden states entering the runner's aux_layers, every row of the step (None: none asked)."""


@dataclass(frozen=True)
class _Laid:
    """Chunks laid out as one forward (a whole step, or one micro-batch of it)."""

    batch: MicroBatch
    scoring: list[prompt_logprobs.PromptRows]
    sampled: int  # the logit rows sampled, before the prompt rows scored

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[ScoredPrompt]]:
        """The forward's float32 logits [R + P, V] -> the sampled rows [R, V] and the prompt tokens scored."""
        if not self.scoring:
            return logits, []
        return logits[: self.sampled], prompt_logprobs.score(self.scoring, logits[self.sampled :])


class ModelRunner:
    """Owns nothing but the step (and the static path's buffers): the model, the KV tensors and the block tables
    are given. `config` says whether pure decodes take the static path (default: EngineConfig's defaults for the
    model's device)."""

    def __init__(self, model: Llama4Model, kv: KVCacheManager, cache: PagedKVCache, *,
                 config: EngineConfig | None = None, aux_layers: Sequence[int] = (),
                 host: HostKVTier | None = None, adapter_slot: Callable[[str | None], int] | None = None) -> None:
        self.model = model
        self.kv = kv
        self.cache = cache
        self.host = host
        """The host KV tier the manager's saves and restores go to and come from (None: none)."""
        self.device = model.device
        self.adapter_slot = adapter_slot
        """A sequence's LoRA adapter's bank slot (-1 for None: the base model); None: LoRA off, and the forward
        gets no adapter_slots. (The engine refuses LoRA with a draft head's aux layers and with the static path.)"""
        self.aux_layers = tuple(aux_layers)
        """Layers whose entering hidden states every step returns (a draft head's input); the static path, which
        returns none, is then off."""
        config = config or EngineConfig(device=str(model.device))
        self.micro_batches = 1 if self.aux_layers else config.micro_batches
        """Micro-batches a step of several chunks is split into (herd.model.micro_batch); 1: whole steps."""
        self.lockstep = False
        """Set by a replica of several trunks (herd.engine.trunk_group): every step is exactly micro_batches
        micro-batches (padded with empty ones; `idle` when there is nothing to run), as every trunk's must be."""
        self.kv_lock: AbstractContextManager[object] = nullcontext()
        """Held around every use of the block tables (the engine's scheduling and bookkeeping, a step's layout),
        never around a forward: the trunks of a replica whose global blocks are shared (herd.engine.shared_blocks)
        share one lock, so that their managers never change the shared pool at once."""
        self.context_parallel: ContextParallel | None = None
        """Set by a replica of several trunks whose global blocks are shared (herd.engine.context_parallel): every
        forward, an empty one too, takes part in each global layer's exchange with the other trunks."""
        self.static = StaticDecode(
            model, kv, cache, batch_sizes=config.decode_batch_sizes, graphs=config.use_cuda_graphs,
            max_graphs=config.max_cuda_graphs,
        ) if config.use_static_decode and not self.aux_layers else None

    def run(self, chunks: Sequence[ScheduledChunk]) -> StepLogits:
        """Compute every chunk; return the sampling chunks' float32 logits and the prompt tokens scored. The step is
        laid out under kv_lock, the forward runs outside it."""
        with self.kv_lock:
            forward = self.prepare(chunks)
        return forward()

    @torch.inference_mode()
    def prepare(self, chunks: Sequence[ScheduledChunk]) -> Callable[[], StepLogits]:
        """Lay the step out now (tokens, block tables, the attention plan and the prompt rows to score are read
        here, on the caller's thread); the call returned runs the model on what was read, so it may run on
        another thread while the caller goes on to schedule the next step. The block moves the KV cache manager
        listed since the last step are made first (make_block_moves)."""
        self.make_block_moves()
        if self.static is not None and self.static.takes(chunks):  # pure decodes: no prompt rows
            static = self.static.prepare(chunks)
            return lambda: StepLogits(static())
        if self.micro_batches > 1 or self.lockstep:
            runs = split_chunks([c.num_tokens for c in chunks], self.micro_batches)
            if len(runs) > 1 or self.lockstep:
                return self._prepare_micro_batches([[chunks[i] for i in run] for run in runs])
        laid = self._layout(chunks)
        batch = laid.batch

        @torch.inference_mode()
        def forward() -> StepLogits:
            aux: torch.Tensor | None = None
            if self.aux_layers:
                logits, aux = self.model.forward_with_aux(
                    batch.input_ids, batch.positions, batch.cache, aux_layers=self.aux_layers,
                    image_embeds=batch.image_embeds, image_rows=batch.image_rows, logit_rows=batch.logit_rows,
                )  # [R + P, V], [N, A*H]
            else:
                logits = self.model(batch.input_ids, batch.positions, batch.cache, image_embeds=batch.image_embeds,
                                    image_rows=batch.image_rows, logit_rows=batch.logit_rows,
                                    adapter_slots=batch.adapter_slots)  # [R + P, V]
            sampled, prompt = laid.split(logits.float())
            return StepLogits(sampled, prompt, aux_hidden=aux)

        return forward

    def idle(self) -> None:
        """A lockstep runner's step with nothing to compute: its micro-batches empty, so the expert shards, which
        wait for every trunk's header of every layer, hear from this trunk too (herd.model.micro_batch)."""
        self.model.forward_micro_batches([self._nothing() for _ in range(self.micro_batches)])

    def _nothing(self) -> MicroBatch:
        """An empty micro-batch; with context parallelism it carries a view of the cache, so that its global layers
        answer the other trunks (herd.model.micro_batch)."""
        if self.context_parallel is None:
            return MicroBatch.nothing()
        return dataclasses.replace(MicroBatch.nothing(), cache=PagedAttention.for_step(
            [], self.kv, self.cache, self.device, self.context_parallel))

    def _prepare_micro_batches(self, runs: list[list[ScheduledChunk]]) -> Callable[[], StepLogits]:
        """prepare for a step split into runs of chunks that ping-pong with the expert shards: each run laid out as
        a step of its own; the sampled rows are the runs' in order, which is the step's. A lockstep runner pads the
        runs with empty micro-batches to micro_batches."""
        laid = [self._layout(run) for run in runs]
        batches = [run.batch for run in laid]
        if self.lockstep:
            batches += [self._nothing() for _ in range(self.micro_batches - len(batches))]

        @torch.inference_mode()
        def forward() -> StepLogits:
            logits = self.model.forward_micro_batches(batches)  # [R_run + P_run, V] each
            parts = [run.split(out.float()) for run, out in zip(laid, logits, strict=False)]
            return StepLogits(torch.cat([sampled for sampled, _ in parts]),
                              [scored for _, prompt in parts for scored in prompt])  # [R, V]

        return forward

    def _layout(self, chunks: Sequence[ScheduledChunk]) -> _Laid:
        """Chunks laid out as one forward: their tokens and positions end to end, images, the rows whose logits are
        sampled (then the prompt rows scored), the adapter slots, and the view of the paged KV cache."""
        ids, positions = self._tokens(chunks)  # [N], [N]
        image_rows, image_embeds = self._images(chunks)  # [M], [M, H]
        ends = itertools.accumulate(c.num_tokens for c in chunks)
        sampling = [row for end, c in zip(ends, chunks, strict=True) if c.samples
                    for row in range(end - 1 - len(c.drafts), end)]
        scoring = prompt_logprobs.plan(chunks)
        logit_rows = torch.tensor(sampling + prompt_logprobs.rows(scoring), dtype=torch.long)  # [R + P]
        context = PagedAttention.for_step(chunks, self.kv, self.cache, self.device, self.context_parallel)
        lora = self._adapter_slots(chunks)  # [N] or None
        if self.device.type == "cuda":  # the model reads ids on the host, then copies without blocking: pin them
            ids, positions, logit_rows = ids.pin_memory(), positions.pin_memory(), logit_rows.pin_memory()
            lora = lora.pin_memory() if lora is not None else None
        return _Laid(MicroBatch(ids, positions, context, logit_rows, lora, image_embeds, image_rows), scoring,
                     len(sampling))

    def make_block_moves(self) -> None:
        """The block moves the KV cache manager listed since they were last made: evicted blocks saved to the host
        tier, host hits restored, then the copy-on-write copies of forked sequences. Before each step's forward, and
        before a prefix export reads blocks or an import overwrites the ones it evicted (herd.engine.kv_export)."""
        saves, restores = self.kv.take_host_moves()
        if saves or restores:
            if self.host is None:
                raise RuntimeError("the KV cache manager lists host tier moves but the runner has no host tier")
            self.host.save(saves)
            self.host.restore(restores)
        if copies := self.kv.take_copies():
            self.cache.copy_blocks(copies)

    def _adapter_slots(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor | None:
        """Each step token's LoRA bank slot [N] (-1: base), or None when LoRA is off or no chunk of the step uses an
        adapter (a base-only step then skips the deltas, which would add exactly zero, whatever is resident)."""
        if self.adapter_slot is None or all(c.seq.adapter is None for c in chunks):
            return None
        slots = torch.tensor([self.adapter_slot(c.seq.adapter) for c in chunks], dtype=torch.int64)  # [C]
        return slots.repeat_interleave(torch.tensor([c.num_tokens for c in chunks]))

    @staticmethod
    def _tokens(chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's ids and positions; a chunk's tokens are sliced from its prompt or output (never both
        joined: a decode costs O(1), not O(context))."""
        ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            start, end = chunk.start, chunk.start + chunk.num_tokens
            if chunk.num_tokens == 1:
                ids.append(token_at(chunk))
                positions.append(start)
                continue
            prompt, output = chunk.seq.prompt_ids, chunk.seq.output_ids
            known = end - len(chunk.drafts)
            ids += prompt[start:known]
            if known > len(prompt):
                ids += output[max(0, start - len(prompt)) : known - len(prompt)]
            ids += chunk.drafts
            positions += range(start, end)
        return torch.tensor(ids), torch.tensor(positions)

    @staticmethod
    def _images(chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Early fusion: the step's rows that are image placeholders of a prompt chunk, and their features."""
        rows: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        row = 0
        for chunk in chunks:
            images = chunk.seq.images
            if images is not None and chunk.start < len(chunk.seq.prompt_ids):
                offsets, found = images.within(chunk.start, chunk.start + chunk.num_tokens)  # [k], [k, H]
                if offsets.numel():
                    rows.append(offsets + row)
                    features.append(found)
            row += chunk.num_tokens
        if not rows:
            return None, None
        return torch.cat(rows), torch.cat(features)
