"""A replica's M trunks stepping in lockstep (issue 28): requests spread over them, one engine per trunk.

Legend: M trunks, N expert shards, K micro-batches per step.

Each trunk is an LLMEngine on its own copy of the trunk (attention, KV cache, shared expert, dense layers) whose
MoE layers dispatch over the replica's collective group (herd.workers.collective_transport with trunks=M): every
shard computes all trunks' rows of a layer in one call, so every trunk must take part in every layer step. The
group keeps them in step: a step of the group is one step of every trunk at once (a thread each), each exactly K
micro-batches (ModelRunner.lockstep: padded with empty micro-batches, and empty ones only for a trunk with nothing
to run), whenever any trunk has work. A new request goes to the trunk chosen by herd.engine.trunk_choice (least
KV used, a prefix-cache hit while not much busier); it stays there.

The group offers what herd.engine.async_engine's AsyncLLMEngine drives of an LLMEngine (prepare, submit, abort,
core_step, the outputs' processing, finish_stopped, stats), so a replica serves M trunks as it serves one; each
trunk's outputs go through its own engine's output processor.

With context parallelism (EngineConfig.context_parallel = M, and each trunk's link to the others) the trunks'
global-layer block pools are one (herd.engine.shared_blocks): a sequence may outgrow its trunk's memory, its
attention computed where its blocks are (herd.engine.context_parallel). The trunks then lay out their steps and keep
their books under one lock (ModelRunner.kv_lock), and run their forwards at once as ever; requests asking for n > 1
or best_of > 1 are refused (a choice's copy-on-write copy would have to be made on the trunk holding the block).

Supported: the engine features that keep a step's forwards to K micro-batches. Refused: static decode / CUDA graphs
(a captured graph is one whole step), async scheduling, an EAGLE-3 head (its steps run whole), LoRA (adapters on
the shards are trunk 0's to load). A trunk whose step fails breaks the group for its peers too (their collectives
fail): the replica restarts whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, Unpack, cast

from herd.engine.block_pool import BlockPool
from herd.engine.config import EngineConfig
from herd.engine.context_parallel import ContextParallel, PeerLink
from herd.engine.errors import HerdError, SamplingError
from herd.engine.grammar import GrammarCompiler
from herd.engine.kv_cache_manager import FULL
from herd.engine.llm_engine import EngineRequest, LLMEngine, RequestOptions
from herd.engine.output_processor import CoreOutput, ProcessedStep
from herd.engine.outputs import RequestOutput
from herd.engine.prefix_hash import block_hashes, cache_salt
from herd.engine.sampling_params import SamplingParams
from herd.engine.shared_blocks import SharedBlocks
from herd.engine.spread_index import SpreadIndex
from herd.engine.stats import EngineStats
from herd.engine.trunk_choice import TrunkLoad, choose_trunk
from herd.model.llama4 import Llama4Model
from herd.model.prompt import Prompt, prompt_ids
from herd.model.tokenizer import Tokenizer

T = TypeVar("T")


class TrunkStep(list[CoreOutput]):
    """One group step's core outputs, all trunks' (a list, as one engine's), with each trunk's part kept apart for
    its own output processor."""

    def __init__(self, parts: list[list[CoreOutput]]) -> None:
        super().__init__(out for part in parts for out in part)
        self.parts = parts


class TrunkOutputs:
    """The group's output processing: each trunk's part of a step through its engine's processor."""

    def __init__(self, engines: Sequence[LLMEngine]) -> None:
        self.engines = engines

    def process(self, step: list[CoreOutput]) -> ProcessedStep:
        if not isinstance(step, TrunkStep):
            raise TypeError("a trunk group's outputs come from its core_step")
        done = ProcessedStep([], [])
        for engine, part in zip(self.engines, step.parts, strict=True):
            processed = engine.outputs.process(part)
            done.outputs += processed.outputs
            done.stopped += processed.stopped
        return done


class TrunkGroup:
    """The M trunks' engines of one replica; driven as one engine (add_request and step, or AsyncLLMEngine)."""

    def __init__(self, engines: Sequence[LLMEngine], *, links: Sequence[PeerLink] | None = None,
                 timeout_s: float | None = None) -> None:
        """`links`: each trunk's link to the others (ranks 0..M-1), when the engines share their global-layer KV
        (EngineConfig.context_parallel = M); `timeout_s` bounds each wait of their exchanges."""
        if not engines:
            raise ValueError("a trunk group needs at least one engine")
        for index, engine in enumerate(engines):
            config = engine.config
            if config.use_static_decode or config.async_scheduling or engine.runner.aux_layers or config.max_loras:
                raise ValueError(f"trunk {index}: static_decode / CUDA graphs, async_scheduling, EAGLE-3 heads and "
                                 "LoRA do not step in lockstep with other trunks yet (a step must be micro_batches "
                                 "forwards; the shards' adapters are one trunk's to load)")
        if len({engine.runner.micro_batches for engine in engines}) != 1:
            raise ValueError("every trunk of a replica runs the same number of micro-batches per step")
        self.engines = list(engines)
        for engine in self.engines:
            engine.runner.lockstep = len(self.engines) > 1
        self.context_parallel = engines[0].config.context_parallel > 1
        if self.context_parallel:
            self._share_global_blocks(links, timeout_s)
        elif links is not None:
            raise ValueError("links between trunks are for context parallelism (EngineConfig.context_parallel > 1)")
        self.outputs = TrunkOutputs(self.engines)
        self._owner: dict[str, int] = {}  # request id -> its trunk, from prepare until it finishes
        self._ids = itertools.count()
        self._threads = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="herd-trunk")

    # --- as one engine ------------------------------------------------------------------------------------------
    @property
    def model(self) -> Llama4Model:
        return self.engines[0].model

    @property
    def config(self) -> EngineConfig:
        return self.engines[0].config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engines[0].tokenizer

    @property
    def grammars(self) -> GrammarCompiler:
        """Trunk 0's compiled constraints (whether one is compiled: each trunk compiles its own when it prepares)."""
        return self.engines[0].grammars

    @property
    def max_model_len(self) -> int:
        return self.engines[0].max_model_len

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None,
                **options: Unpack[RequestOptions]) -> EngineRequest:
        """The request prepared by the trunk choose_trunk picks now (it is submitted there); safe from any thread."""
        if self.context_parallel and params is not None and max(params.n, params.best_of or 1) > 1:
            raise SamplingError("best_of" if params.n == 1 else "n", "n > 1 and best_of > 1 are not served with "
                                "context parallelism yet: choices share their prompt's blocks, and one written by a "
                                "choice must be copied where it lives, maybe on another trunk")
        keys = self._prefix_keys(prompt, options)
        trunk = choose_trunk([self._load(engine, keys) for engine in self.engines])
        if options.get("request_id") is None:
            options["request_id"] = f"req-{next(self._ids)}"
        request = self.engines[trunk].prepare(prompt, params, **options)
        self._owner[request.seq.request_id] = trunk
        return request

    def submit(self, request: EngineRequest) -> None:
        rid = request.seq.request_id
        trunk = self._owner.get(rid)
        if trunk is None:
            raise ValueError(f"request {rid!r} was not prepared by this trunk group")
        self.engines[trunk].submit(request)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    **options: Unpack[RequestOptions]) -> str:
        """Queue a request on the trunk choose_trunk picks; its id (the group's, unless one is given)."""
        request = self.prepare(prompt, params, **options)
        self.submit(request)
        return request.seq.request_id

    def trunk_of(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def abort(self, request_id: str) -> bool:
        trunk = self._owner.get(request_id)
        return trunk is not None and self.engines[trunk].abort(request_id)

    def abort_all(self) -> int:
        return sum(engine.abort_all() for engine in self.engines)

    def has_unfinished(self) -> bool:
        return any(engine.has_unfinished() for engine in self.engines)

    def fail_unfinished(self, err: HerdError) -> list[RequestOutput]:
        return [out for engine in self.engines for out in engine.fail_unfinished(err)]

    def core_step(self) -> list[CoreOutput]:
        """One core step of every trunk at once (an idle trunk's is empty micro-batches), when any has work. The
        first trunk's error is raised once every trunk's step has returned."""
        if not self.has_unfinished():
            return TrunkStep([[] for _ in self.engines])
        parts = self._all(lambda engine: engine.core_step())
        return TrunkStep(parts)

    def finish_stopped(self, request_ids: Sequence[str]) -> None:
        for engine in self.engines:
            engine.finish_stopped(request_ids)  # each ends those it holds

    def step(self) -> list[RequestOutput]:
        """core_step, its outputs processed: every trunk's."""
        processed = self.outputs.process(self.core_step())
        self.finish_stopped(processed.stopped)
        self._forget(processed.outputs)
        return processed.outputs

    def stats(self) -> EngineStats:
        """Every trunk's stats summed (counts and blocks), a fault hold if any trunk is in one."""
        return combined([engine.stats() for engine in self.engines])

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run prompts to completion over the trunks: each one's final output (one choice each), in order."""
        ids = [self.add_request(prompt, params) for prompt in prompts]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            final.update((out.request_id, out) for out in self.step() if out.finished)
        return [final[rid] for rid in ids]

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    # --- inside -----------------------------------------------------------------------------------------------------
    def _share_global_blocks(self, links: Sequence[PeerLink] | None, timeout_s: float | None) -> None:
        """Context parallelism: the trunks' global-layer pools as one (herd.engine.shared_blocks), one lock around
        their managers, and every runner's part in the global layers' exchange (herd.engine.context_parallel)."""
        trunks = len(self.engines)
        if links is None or len(links) != trunks:
            raise ValueError(f"context parallelism over {trunks} trunks needs a link for each")
        if any(engine.config.context_parallel != trunks for engine in self.engines):
            raise ValueError(f"every trunk's EngineConfig.context_parallel is the trunk count, {trunks}")
        pools = [engine.kv.pools.get(FULL) for engine in self.engines]
        if not all(isinstance(pool, BlockPool) for pool in pools):
            raise ValueError("context parallelism shares the global layers' block pools; these trunks have none of "
                             "their own")
        shared = SharedBlocks(cast("list[BlockPool]", pools))
        lock = threading.Lock()
        for rank, (engine, link) in enumerate(zip(self.engines, links, strict=True)):
            if link.rank != rank:
                raise ValueError(f"trunk {rank}'s link is rank {link.rank} of the group")
            view = shared.view(rank)
            engine.kv.share_pool(FULL, view)
            engine.runner.kv_lock = lock
            text = engine.model.config
            engine.runner.context_parallel = ContextParallel(
                link, trunks, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                head_dim=text.head_dim, dtype=engine.config.dtype,
                index=SpreadIndex(view, engine.config.block_size, engine.runner.device), timeout_s=timeout_s)

    def _all(self, call: Callable[[LLMEngine], T]) -> list[T]:
        futures = [self._threads.submit(call, engine) for engine in self.engines]
        if error := next((e for e in (future.exception() for future in futures) if e is not None), None):
            raise error
        return [future.result() for future in futures]

    def _forget(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)

    @staticmethod
    def _load(engine: LLMEngine, keys: list[bytes]) -> TrunkLoad:
        """What a trunk holds, and how many blocks of the prompt's prefix chain `keys` its cache could give."""
        stats = engine.stats()
        prefix = engine.kv.locate_prefix(keys)[0] if keys and engine.config.enable_prefix_caching else 0
        return TrunkLoad(kv_blocks_held=stats.kv_blocks_held, requests=stats.running + stats.waiting,
                         prefix_blocks=prefix)

    def _prefix_keys(self, prompt: Prompt, options: RequestOptions) -> list[bytes]:
        """The prompt's text blocks' prefix-cache keys under the request's salt, once for every trunk (the trunks
        share tokenizer and block size; images aside, so an image prompt's hit is a lower bound); none when the
        prompt is bad (prepare says why)."""
        engine = self.engines[0]
        try:
            ids = prompt_ids(engine.tokenizer, prompt, engine.model.config.vocab_size)
        except ValueError:
            return []
        salt = cache_salt(options.get("tenant_id", "default"), options.get("sharing_group"))
        return block_hashes(ids[: len(ids) - 1], engine.config.block_size, salt)


def combined(stats: Sequence[EngineStats]) -> EngineStats:
    """Several engines' stats as one: numbers and per-group blocks summed, the latest recovery's time the longest, a
    hold if any is holding."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(EngineStats):
        parts = [getattr(s, field.name) for s in stats]
        if isinstance(parts[0], dict):
            values[field.name] = {key: sum(p.get(key, 0) for p in parts) for key in parts[0]}
        elif isinstance(parts[0], bool):
            values[field.name] = any(parts)
        elif field.name == "fault_last_recovery_s":
            values[field.name] = max(parts)
        else:
            values[field.name] = sum(parts)
    return EngineStats(**values)
