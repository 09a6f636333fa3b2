"""A replica's M trunks stepping in lockstep (issue 28): requests spread over them, one engine per trunk.

Legend: M trunks, N expert shards, K micro-batches per step.

Each trunk is an LLMEngine on its own copy of the trunk (attention, KV cache, shared expert, dense layers) whose
MoE layers dispatch over the replica's collective group (herd.workers.collective_transport with trunks=M): every
shard computes all trunks' rows of a layer in one call, so every trunk must take part in every layer step. The
group keeps them in step: a step of the group is one step of every trunk at once (a thread each), each exactly K
micro-batches (ModelRunner.lockstep: padded with empty micro-batches, and empty ones only for a trunk with nothing
to run), whenever any trunk has work. A new request goes to the trunk chosen by herd.workers.trunk_choice (least
KV used, a prefix-cache hit while not much busier); it stays there.

Supported: the engine features that keep a step's forwards to K micro-batches. Refused: static decode / CUDA graphs
(a captured graph is one whole step), async scheduling, an EAGLE-3 head (its steps run whole). A trunk whose step
fails breaks the group for its peers too (their collectives fail): the replica restarts whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Unpack

from herd.engine import LLMEngine, SamplingParams
from herd.engine.llm_engine import RequestOptions
from herd.engine.outputs import RequestOutput
from herd.engine.prefix_hash import block_hashes, cache_salt
from herd.model.prompt import Prompt, prompt_ids
from herd.workers.trunk_choice import TrunkLoad, choose_trunk


class TrunkGroup:
    """The M trunks' engines of one replica; add_request and step as one engine's."""

    def __init__(self, engines: Sequence[LLMEngine]) -> None:
        if not engines:
            raise ValueError("a trunk group needs at least one engine")
        for index, engine in enumerate(engines):
            config = engine.config
            if config.use_static_decode or config.async_scheduling or engine.runner.aux_layers:
                raise ValueError(f"trunk {index}: static_decode / CUDA graphs, async_scheduling and EAGLE-3 heads do "
                                 "not step in lockstep with other trunks yet (a step must be micro_batches forwards)")
        if len({engine.runner.micro_batches for engine in engines}) != 1:
            raise ValueError("every trunk of a replica runs the same number of micro-batches per step")
        self.engines = list(engines)
        for engine in self.engines:
            engine.runner.lockstep = len(self.engines) > 1
        self._owner: dict[str, int] = {}  # request id -> its trunk
        self._ids = itertools.count()
        self._threads = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="herd-trunk")

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    **options: Unpack[RequestOptions]) -> str:
        """Queue a request on the trunk choose_trunk picks; its id (the group's, unless one is given)."""
        trunk = choose_trunk([self._load(i, prompt, options) for i in range(len(self.engines))])
        options.setdefault("request_id", f"req-{next(self._ids)}")
        rid = self.engines[trunk].add_request(prompt, params, **options)
        self._owner[rid] = trunk
        return rid

    def trunk_of(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def abort(self, request_id: str) -> bool:
        trunk = self._owner.get(request_id)
        return trunk is not None and self.engines[trunk].abort(request_id)

    def has_unfinished(self) -> bool:
        return any(engine.has_unfinished() for engine in self.engines)

    def step(self) -> list[RequestOutput]:
        """One step of every trunk at once (an idle trunk's is empty micro-batches), when any has work; the outputs
        of all. The first trunk's error is raised once every trunk's step has returned."""
        if not self.has_unfinished():
            return []
        futures = [self._threads.submit(engine.step) for engine in self.engines]
        outputs: list[RequestOutput] = []
        errors = [future.exception() for future in futures]
        if error := next((e for e in errors if e is not None), None):
            raise error
        for future in futures:
            outputs += future.result()
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run prompts to completion over the trunks: each one's final output (one choice each), in order."""
        ids = [self.add_request(prompt, params) for prompt in prompts]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            final.update((out.request_id, out) for out in self.step() if out.finished)
        return [final[rid] for rid in ids]

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def _load(self, index: int, prompt: Prompt, options: RequestOptions) -> TrunkLoad:
        engine = self.engines[index]
        stats = engine.stats()
        return TrunkLoad(kv_blocks_held=stats.kv_blocks_held, requests=stats.running + stats.waiting,
                         prefix_blocks=self._prefix_blocks(engine, prompt, options))

    @staticmethod
    def _prefix_blocks(engine: LLMEngine, prompt: Prompt, options: RequestOptions) -> int:
        """Blocks of the prompt's text (images aside: the count is then a lower bound) that the trunk's prefix cache
        holds under the request's salt; 0 with prefix caching off."""
        if not engine.config.enable_prefix_caching or options.get("adapter") is not None:
            return 0
        try:
            ids = prompt_ids(engine.tokenizer, prompt, engine.model.config.vocab_size)
        except ValueError:
            return 0  # add_request says what is wrong with it
        salt = cache_salt(options.get("tenant_id", "default"), options.get("sharing_group"))
        keys = block_hashes(ids[: len(ids) - 1], engine.config.block_size, salt)
        return engine.kv.locate_prefix(keys)[0] if keys else 0
