"""LLMEngine: requests in, tokens out. A step is schedule -> run -> postprocess.

Usable alone (`generate` for a batch) and as the core of the async engine and the model replicas.
Requests are checked before they join (a bad one raises ValueError and disturbs nothing); a request
that finishes or is aborted gives its KV blocks back in the same step. A request may carry images
(preprocessed tiles): the engine's vision tower turns them into features when the request is prepared,
and the model runner puts those in place of the prompt's ``<|patch|>`` tokens. A request of n choices (or
best_of candidates) runs one sequence per candidate over one prompt computation (herd.engine.request_group).
A step that fails for want of the experts (a shard unavailable or late) is held and retried, its requests kept at
their last token, for up to fault_hold_s before they fail (herd.engine.fault_hold).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

import torch

from herd.engine import kv_export, prompt_logprobs
from herd.engine.adapter_residency import AdapterResidency
from herd.engine.config import EngineConfig
from herd.engine.detokenizer import IncrementalDetokenizer
from herd.engine.errors import Code, HerdError
from herd.engine.fault_hold import FaultHold
from herd.engine.grammar import GrammarCompiler
from herd.engine.grammar_mask import GrammarMask, MaskFiller
from herd.engine.host_block_index import host_blocks
from herd.engine.host_kv_tier import HostKVTier
from herd.engine.kv_cache_manager import CachedBlock, KVCacheManager
from herd.engine.kv_export import KVExport, KVExportLayout
from herd.engine.model_runner import ModelRunner, StepLogits
from herd.engine.output_processor import CoreOutput, OutputProcessor, RequestState
from herd.engine.outputs import RequestOutput
from herd.engine.paged_kv import PagedKVCache
from herd.engine.penalties import History, needs_history
from herd.engine.prefix_hash import block_hashes, cache_salt
from herd.engine.prompt_images import ImageInput, PromptImages, pixel_digest
from herd.engine.prompt_logprobs import ScoredPrompt
from herd.engine.request_group import Candidates, RequestGroups, candidate, candidate_id, fan_out, fork_computed
from herd.engine.sampler import TokenLogprobs, sample_batch
from herd.engine.sampling_params import SamplingError, SamplingParams
from herd.engine.scheduler import Scheduler, SchedulerOutput
from herd.engine.sequence import Sequence
from herd.engine.speculative.proposer import StepRows
from herd.engine.speculative.speculator import Speculator
from herd.engine.speculative.verify import VerifyRows, accepted_count, verify_rows
from herd.engine.stats import EngineStats
from herd.engine.step_pipeline import StepPipeline
from herd.engine.stop_strings import StopStrings
from herd.model.llama4 import Llama4Model
from herd.model.loader import load_model
from herd.model.lora import LoRAAdapter, load_adapter
from herd.model.prompt import Prompt, as_prompt, is_token_list, prompt_ids
from herd.model.tokenizer import Tokenizer
from herd.model.vision import VisionTower, load_vision_if_multimodal


class RequestOptions(TypedDict, total=False):
    """Who sends a request and what comes with it (keyword arguments of add_request, prepare and generate)."""

    request_id: str | None
    """The caller's id for the request (default: one the engine makes); unique among unfinished requests."""
    tenant_id: str
    """Whose request it is (fair share and the prefix cache's namespace); default "default"."""
    tenant_weight: float
    """The tenant's share of the engine relative to others (positive); default 1."""
    sharing_group: str | None
    """A prefix-cache namespace several tenants opted into (default: the tenant's own)."""
    images: Seq[ImageInput]
    """Preprocessed images for the prompt's image placeholders, in order."""
    adapter: str | None
    """A registered LoRA adapter to run the request with (add_adapter); None: the base model."""


@dataclass(eq=False)
class EngineRequest:
    """A checked request: the core's sequence and the output processor's state (of its first candidate; the
    others' sequences are seq.forks, their states fork_states)."""

    seq: Sequence
    state: RequestState
    fork_states: list[RequestState] = field(default_factory=list)

    @property
    def sequences(self) -> list[Sequence]:
        return [self.seq, *self.seq.forks]

    @property
    def states(self) -> list[RequestState]:
        return [self.state, *self.fork_states]


class LLMEngine:
    """Continuous-batching engine over one Llama 4 model."""

    def __init__(self, model: Llama4Model, tokenizer: Tokenizer, config: EngineConfig | None = None, *,
                 vision: VisionTower | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.vision = vision
        """The vision tower (None: text only; requests with images are refused)."""
        self.tokenizer = tokenizer
        self.max_model_len = self.config.context_limit(model.config)
        speculative = self.config.speculative
        layout = self.config.kv_layout(model.config, extra_bytes_per_block=Speculator.kv_bytes_per_block(
            speculative, self.config.block_size, self.config.kv_dtype) if speculative is not None else None)
        host_slots = host_blocks(layout, self.config.host_kv_cache_bytes) \
            if self.config.host_kv_cache_bytes and self.config.enable_prefix_caching else None
        self.kv = KVCacheManager(layout, enable_prefix_caching=self.config.enable_prefix_caching,
                                 host_blocks=host_slots)
        cache = PagedKVCache(model.config, layout, dtype=self.config.dtype, device=torch.device(self.config.device),
                             kv_dtype=self.config.kv_dtype)
        self.speculator = Speculator.build(speculative, model, self.kv, cache) if speculative is not None else None
        """Proposes draft tokens between steps (speculative decoding; None: off)."""
        host = HostKVTier(cache, host_slots) if self.kv.host is not None and host_slots else None  # every layer added
        self.lora = AdapterResidency(model.new_adapter_bank(slots=self.config.max_loras,
                                                            max_rank=self.config.max_lora_rank)) \
            if self.config.max_loras else None
        """The registered LoRA adapters and the bank's occupants (None: LoRA off, max_loras 0)."""
        self.runner = ModelRunner(model, self.kv, cache, config=self.config, host=host,
                                  aux_layers=self.speculator.aux_layers if self.speculator is not None else (),
                                  adapter_slot=self.lora.slot if self.lora is not None else None)
        self.scheduler = Scheduler(self.config.scheduler(), self.kv)
        if self.lora is not None:
            self.scheduler.admissible = self._adapter_resident
        self.outputs = OutputProcessor()
        """Detokenising, stop strings and RequestOutputs (`step` runs it inline; the async engine on its own
        thread, one step behind the core)."""
        self._requests: dict[str, Sequence] = {}  # unfinished, by id (a candidate's: request_group.candidate_id)
        self._groups = RequestGroups()
        self._aborted: list[Sequence] = []
        self._ids = itertools.count()
        self._generator = torch.Generator(device=torch.device(self.config.device))
        """Uniforms for the unseeded requests' draws (seeded ones hash their own); seeded at random."""
        self._generator.seed()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-model") \
            if self.config.async_scheduling else None
        """Runs each step's forward and sampling while this thread schedules the next step (async scheduling)."""
        self._next: SchedulerOutput | None = None  # the next step, scheduled while the last one computed
        self.grammars = GrammarCompiler(tokenizer, cache_size=self.config.grammar_cache_size,
                                        timeout_s=self.config.grammar_compile_timeout_s)
        """Structured-output constraints compiled for this tokenizer (cached per schema/regex/grammar)."""
        self._masks: MaskFiller | None = None  # made with the first constrained request
        self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-mask")
        """Fills a step's token masks while its forward runs."""
        self._draft_tokens = 0  # speculative decoding since the start: drafts verified, and accepted
        self._accepted_tokens = 0
        self._exported_blocks = 0  # prefix blocks exported to and imported from other engines since the start
        self._imported_blocks = 0
        self.faults = FaultHold(self.config.fault_hold_s)
        """Steps that fail for want of the experts: held and retried (synchronous steps), failures counted."""

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        config = config or EngineConfig()
        model = load_model(path, dtype=config.dtype, device=config.device, progress=False)
        vision = load_vision_if_multimodal(path, dtype=config.dtype, device=config.device)
        return cls(model, Tokenizer.from_pretrained(path), config, vision=vision)

    # --- LoRA adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: str | Path | LoRAAdapter) -> None:
        """Register the PEFT adapter at a path (or one load_adapter read already) as `name`: loaded and checked
        against the model now, kept on the host, put into the bank when a request needs it. AdapterError (nothing
        registered) if it cannot run here; ValueError for a taken name or with LoRA off. Between steps (it changes
        the engine's state)."""
        lora = self._lora_on()
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in lora.registered:
            raise ValueError(f"adapter {name!r} is already registered")
        loaded = adapter if isinstance(adapter, LoRAAdapter) else load_adapter(adapter, self.model.config)
        lora.register(name, loaded)

    def remove_adapter(self, name: str) -> None:
        """Forget adapter `name` (its slot is emptied); ValueError if it is unknown or an unfinished request uses
        it. Between steps."""
        lora = self._lora_on()
        if name not in lora.registered:
            raise ValueError(f"no adapter {name!r} is registered")
        if users := sorted(seq.request_id for seq in self._requests.values() if seq.adapter == name):
            raise ValueError(f"adapter {name!r} is in use by {len(users)} unfinished request(s), e.g. {users[0]!r}")
        lora.unregister(name)

    def adapters(self) -> list[str]:
        """The registered adapters' names, in registration order (empty with LoRA off)."""
        return list(self.lora.registered) if self.lora is not None else []

    def _lora_on(self) -> AdapterResidency:
        if self.lora is None:
            raise ValueError("LoRA adapters are off in this engine (max_loras is 0)")
        return self.lora

    def _check_adapter(self, name: str | None) -> None:
        if name is not None and (self.lora is None or name not in self.lora.registered):
            known = sorted(self.lora.registered) if self.lora is not None else []
            raise ValueError(f"unknown adapter {name!r}; registered: {known}" if self.lora is not None
                             else f"adapter {name!r} asked for, but LoRA adapters are off (max_loras is 0)")

    def _adapter_resident(self, seq: Sequence) -> bool:
        """The scheduler's admission check: seq's adapter is (made) resident without evicting one that a running
        sequence uses."""
        if seq.adapter is None:
            return True
        assert self.lora is not None
        pinned = {s.adapter for s in self.scheduler.running if s.adapter is not None}
        return self.lora.ensure(seq.adapter, pinned)

    # --- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    **options: Unpack[RequestOptions]) -> str:
        """Queue a request; ValueError (and nothing queued) if any part of it is invalid."""
        request = self.prepare(prompt, params, **options)
        self.submit(request)
        return request.seq.request_id

    def prepare(self, prompt: Prompt, params: SamplingParams | None = None,
                **options: Unpack[RequestOptions]) -> EngineRequest:
        """Check and tokenize a request, and encode its images, without touching the engine's state (safe
        from any thread)."""
        known = RequestOptions.__optional_keys__
        if unknown := set(options) - known:
            raise TypeError(f"unknown request options {sorted(unknown)}; known: {sorted(known)}")
        tenant_id, tenant_weight = options.get("tenant_id", "default"), options.get("tenant_weight", 1.0)
        request_id, sharing_group = options.get("request_id"), options.get("sharing_group")
        images = options.get("images", ())
        adapter = options.get("adapter")
        self._check_adapter(adapter)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(tenant_weight, (int, float)) or isinstance(tenant_weight, bool) or not tenant_weight > 0:
            raise ValueError(f"tenant_weight must be a positive number, got {tenant_weight!r}")
        ids = prompt_ids(self.tokenizer, prompt, self.model.config.vocab_size)
        vocab = self.model.config.vocab_size
        outside = [token for token, _ in params.logit_bias if token >= vocab]
        if outside:
            raise SamplingError("logit_bias", f"logit_bias names token ids {outside[:5]} outside the vocabulary "
                                              f"(0..{vocab - 1})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context limit is {self.max_model_len} (prompt + at least 1 new)"
            )
        total = params.num_candidates
        if total > self.scheduler.config.max_num_seqs:
            raise SamplingError("best_of" if params.best_of is not None else "n",
                                f"{total} choices of one request run at once; this engine runs at most "
                                f"max_num_seqs={self.scheduler.config.max_num_seqs} sequences")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        ids_in_use = [candidate_id(rid, i) for i in range(total) if candidate_id(rid, i) in self._requests]
        if ids_in_use or rid in self._groups:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(
            request_id=rid, prompt_ids=ids, params=params, tenant_id=tenant_id, tenant_weight=float(tenant_weight),
            cache_salt=cache_salt(tenant_id, sharing_group) + self._adapter_salt(adapter), adapter=adapter,
            stop_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                        else frozenset(self.tokenizer.stop_ids)),
            bad_words=self._bad_word_ids(params.bad_words),
            grammar=self.grammars.start(params.structured) if params.structured is not None else None,
            images=self._encode_images(ids, images) if images else None,
            token_limit=min(len(ids) + params.max_tokens, self.max_model_len),
        )
        return self._with_states([seq, *(candidate(seq, i) for i in range(1, total))])

    def _adapter_salt(self, adapter: str | None) -> str:
        """What the adapter adds to the prefix-cache salt: its registration's tag, so that the KV of one adapter
        never serves another, the base model, or a later adapter registered under the same name."""
        if adapter is None:
            return ""
        assert self.lora is not None
        return f"|lora:{self.lora.registered[adapter].tag}"

    def _with_states(self, seqs: list[Sequence]) -> EngineRequest:
        """The request of these candidate sequences (the first one leads; the others are its forks), with the
        output processor's state of each."""
        seqs[0].forks = seqs[1:]
        leader, params = seqs[0], seqs[0].params
        candidates = Candidates(len(seqs), params.n) if params.ranks_candidates else None
        states = [RequestState(
            request_id=seq.request_id, tenant_id=seq.tenant_id, prompt_token_ids=seq.prompt_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer), stops=StopStrings(params.stop),
            include_stop_str=params.include_stop_str_in_output, arrived_ns=seq.arrived_ns,
            logprobs=[] if params.logprobs is not None else None, public_id=leader.request_id, index=seq.index,
            candidates=candidates,
        ) for seq in seqs]
        return EngineRequest(seq=leader, state=states[0], fork_states=states[1:])

    def submit(self, request: EngineRequest) -> None:
        rid = request.seq.request_id
        if any(s.request_id in self._requests or s.request_id in self.outputs for s in request.states) \
                or rid in self._groups:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = request.seq
        if seq.adapter is not None and (self.lora is None or seq.adapter not in self.lora.registered
                                        or not seq.cache_salt.endswith(self._adapter_salt(seq.adapter))):
            raise ValueError(f"adapter {seq.adapter!r} was removed (or registered again) since the request was "
                             "prepared")
        for state in request.states:
            self.outputs.add(state)
        for seq in request.sequences:
            self._requests[seq.request_id] = seq
        self._groups.add(request.sequences)
        self.scheduler.add(request.seq)  # the others are forked from it once its prompt is computed

    def abort(self, request_id: str) -> bool:
        """Stop a request (every choice of it) now; its blocks are freed and the next step reports it with reason
        "abort"."""
        members = self._groups.members(request_id) or [seq for seq in [self._requests.get(request_id)] if seq]
        unfinished = [seq for seq in members if seq.request_id in self._requests]
        for seq in unfinished:
            self._end(seq, "abort")
            self._aborted.append(seq)
        return bool(unfinished)

    def abort_all(self) -> int:
        """Abort every unfinished request (a replica shutting down); how many there were."""
        return sum(self.abort(rid) for rid in list(self._requests))

    def fail_unfinished(self, err: HerdError) -> list[RequestOutput]:
        """End every unfinished request with `err` (a step raised what no request's error covers: a bug, never a
        hang): their blocks go back, and their last outputs carry the error."""
        core = [self._core_output(seq, []) for seq in self._aborted]
        self._aborted.clear()
        for seq in list(self._requests.values()):
            seq.error = err
            self._end(seq, "error")
            core.append(self._core_output(seq, []))
        processed = self.outputs.process(core)
        self.finish_stopped(processed.stopped)
        return processed.outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    def stats(self) -> EngineStats:
        """What the engine holds now: requests by state, KV blocks per group, prefix-cache and preemption counts."""
        pools = self.kv.pools
        return EngineStats(
            running=len(self.scheduler.running), waiting=sum(len(q) for q in self.scheduler.waiting.values()),
            kv_blocks={g: p.num_blocks for g, p in pools.items()},
            kv_blocks_used={g: p.used for g, p in pools.items()},
            prefix_queried_tokens=self.kv.prefix_queried_tokens, prefix_hit_tokens=self.kv.prefix_hit_tokens,
            preemptions=self.scheduler.num_preemptions, draft_tokens=self._draft_tokens,
            accepted_tokens=self._accepted_tokens,
            host_kv_blocks=sum(host.capacity.values()) if (host := self.kv.host) is not None else 0,
            host_kv_blocks_held=sum(host.held(g) for g in host.capacity) if host is not None else 0,
            host_kv_hit_blocks=self.kv.host_hit_blocks, host_kv_hit_tokens=self.kv.host_hit_tokens,
            host_kv_saved_bytes=self.kv.host_saved_bytes, host_kv_restored_bytes=self.kv.host_restored_bytes,
            kv_exported_blocks=self._exported_blocks, kv_imported_blocks=self._imported_blocks,
            lora_adapters_registered=len(self.lora.registered) if self.lora is not None else 0,
            lora_adapters_resident=self.lora.resident if self.lora is not None else 0,
            lora_adapter_loads=self.lora.loads if self.lora is not None else 0,
            lora_adapter_evictions=self.lora.evictions if self.lora is not None else 0,
            fault_failed_steps=self.faults.failed_steps, fault_holds=self.faults.holds,
            fault_recoveries=self.faults.recoveries, fault_last_recovery_s=self.faults.last_recovery_s,
            fault_held=self.faults.holding,
        )

    # --- a prompt's KV between engines (prefill/decode disaggregation) --------------------------------
    def export_prefix(self, prompt_ids: Seq[int], cache_salt: str) -> KVExport:
        """The KV blocks a request of this prompt and salt (herd.engine.prefix_hash.cache_salt) would take from this
        engine's prefix cache or host tier, for another engine to import (herd.engine.kv_export). It reads the
        engine's state: call it between steps (AsyncLLMEngine.run_between_steps)."""
        self._check_prefix_caching()
        tokens = list(prompt_ids[: len(prompt_ids) - 1])  # a prefix hit leaves the last token to compute
        self.runner.make_block_moves()  # every block placed below holds its contents
        hit, places = self.kv.locate_prefix(block_hashes(tokens, self.config.block_size, cache_salt))
        export = KVExport(layout=self.kv_export_layout, salt=cache_salt,
                          token_ids=tuple(tokens[: hit * self.config.block_size]),
                          tensors=kv_export.gather(self.runner.cache, self.runner.host, places))
        self._exported_blocks += sum(map(len, places.values()))
        return export

    def import_prefix(self, export: KVExport) -> int:
        """Put an export's blocks into the device prefix cache, cached and unreferenced (evictable like any) under the
        keys their tokens and salt give, skipping those cached on the device already; the blocks written (0 when a
        pool has no room for them all). ValueError for an export of another model or cache layout. It changes the
        engine's state: call it between steps (AsyncLLMEngine.run_between_steps)."""
        self._check_prefix_caching()
        blocks = {group: len(self.kv.needed_range(group, export.num_blocks)) for group in self.kv.pools}
        plan = self.kv.reserve_import(export.keys_for(self.kv_export_layout, blocks))
        if plan is None:
            return 0
        self.runner.make_block_moves()  # blocks the reservation evicted are saved to the host before overwritten
        kv_export.scatter(self.runner.cache, plan, export)
        written = self.kv.finish_import(plan)
        self._imported_blocks += written
        return written

    @functools.cached_property
    def kv_export_layout(self) -> KVExportLayout:
        """What an engine importing this engine's KV must share with it (draft-head layers included)."""
        return KVExportLayout.of(self.model.config, self.config.dtype, self.runner.cache)

    def _check_prefix_caching(self) -> None:
        if not self.config.enable_prefix_caching:
            raise ValueError("moving a prompt's KV between engines needs enable_prefix_caching on both")

    # --- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; outputs for every request that got a token or finished."""
        processed = self.outputs.process(self.core_step())
        self.finish_stopped(processed.stopped)
        return processed.outputs

    def core_step(self) -> list[CoreOutput]:
        """The step's critical path: schedule, run the model, sample, and every finish the next batch depends
        on; the text side is the output processor's."""
        if self._model_thread is not None:
            return self._overlapped_step()
        with self.runner.kv_lock:
            scheduled = self.scheduler.schedule()
        leaders = [c.seq for c in scheduled.chunks if c.samples]
        sampling, rows = fan_out(leaders)
        verify = verify_rows(scheduled.chunks, sampling, rows)
        masks = self._start_masks(sampling, verify)
        try:
            step = self.runner.run(scheduled.chunks) if scheduled.chunks else None  # laid out under kv_lock
            if step is None and self.runner.lockstep:  # one of several trunks: its peers' step is this one's too
                self.runner.idle()
        except HerdError as err:
            with self.runner.kv_lock:
                return self._step_failed(scheduled, err)
        with self.runner.kv_lock:
            return self._step_done(scheduled, step, leaders, sampling, rows, verify, masks)

    def _step_done(self, scheduled: SchedulerOutput, step: StepLogits | None, leaders: list[Sequence],
                   sampling: list[Sequence], rows: list[int] | None, verify: VerifyRows | None,
                   masks: Future[GrammarMask | None] | None) -> list[CoreOutput]:
        """A synchronous step after its forward: the blocks it filled cached, forks, sampling, finishes."""
        self.scheduler.on_step_done(scheduled)
        fork_computed(leaders, self.kv, self.scheduler)
        if step is None:
            return self._record([], [], [])
        self.faults.on_success()
        if verify is None:
            outputs = self._record(sampling, *self._sample(step.sampled, sampling, rows, masks), step.prompt)
        else:
            outputs = self._record_verified(sampling, verify, *self._sample_rows(step.sampled, verify, masks),
                                            step.prompt)
        if self.speculator is not None:
            self._propose(scheduled, step.aux_hidden)
        return outputs

    def _overlapped_step(self) -> list[CoreOutput]:
        """Async scheduling: this step (scheduled during the last one's forward) is laid out here, then computed
        and sampled on the model thread while this thread schedules the next step, counting each sampling
        sequence's token as known (num_pending). What that next schedule could not know is settled when it
        runs: a sequence that stopped (or was aborted) meanwhile is dropped from it."""
        assert self._model_thread is not None
        scheduled, self._next = self._next, None
        if scheduled is not None:
            scheduled.chunks = [c for c in scheduled.chunks if not c.seq.is_finished]
        if scheduled is None or not scheduled.chunks:
            scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            return self._record([], [], [])
        leaders = [c.seq for c in scheduled.chunks if c.samples]
        sampling, rows = fan_out(leaders)
        forward = self.runner.prepare(scheduled.chunks)  # reads the tokens and block tables now, on this thread
        masks = self._start_masks(sampling)
        in_flight = self._model_thread.submit(self._forward_and_sample, forward, [seq.params for seq in sampling],
                                              [seq.draw_position for seq in sampling], _histories(sampling), rows,
                                              masks)
        for seq in sampling:
            seq.num_pending = 1
        registered = self.scheduler.on_step_done(scheduled)  # its blocks are written before the next step reads them
        fork_computed(leaders, self.kv, self.scheduler)  # before the next schedule, which runs the forked choices
        try:
            self._next = self.scheduler.schedule()
        finally:
            error = in_flight.exception()
            for seq in sampling:
                seq.num_pending = 0
        if isinstance(error, HerdError):  # the step has been counted done and the next scheduled
            final = self.faults.on_failure(error)
            if final is None:
                return self._hold_overlapped(scheduled, registered)
            return self._fail_overlapped(scheduled, registered, final)
        if error is not None:
            raise error
        self.faults.on_success()
        return self._record(sampling, *in_flight.result())

    def _bad_word_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each banned word's token sequences: as it stands and after a space (how it appears mid-text), as
        plain text (a special token's spelling is not its id)."""
        sequences = {tuple(self.tokenizer.encode(form, literal=True)) for word in words
                     for form in (word, " " + word.lstrip())}
        return tuple(sorted(s for s in sequences if s))

    def _forward_and_sample(self, forward: Callable[[], StepLogits], params: list[SamplingParams],
                            positions: list[int], histories: list[History | None], rows: list[int] | None,
                            masks: Future[GrammarMask | None] | None,
                            ) -> tuple[list[int], list[TokenLogprobs | None], list[ScoredPrompt]]:
        """On the model thread: nothing here reads the engine's state, which the scheduler changes meanwhile
        (the histories are copies; the prompt rows were planned and the masks read from the grammars when the
        step was laid out)."""
        step = forward()
        sampled = sample_batch(_rows(step.sampled, rows), params, positions, self._generator, histories,
                               masks.result() if masks is not None else None)
        return *sampled, step.prompt

    def _sample(self, logits: torch.Tensor, sampling: list[Sequence], rows: list[int] | None,
                masks: Future[GrammarMask | None] | None) -> tuple[list[int], list[TokenLogprobs | None]]:
        return sample_batch(_rows(logits, rows), [seq.params for seq in sampling],
                            [seq.draw_position for seq in sampling], self._generator, _histories(sampling),
                            masks.result() if masks is not None else None)

    def _sample_rows(self, logits: torch.Tensor, verify: VerifyRows, masks: Future[GrammarMask | None] | None,
                     ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """A verifying step's samples: one per expanded row (herd.engine.speculative.verify)."""
        return sample_batch(_rows(logits, verify.logit_rows), verify.params, verify.positions, self._generator,
                            verify.histories, masks.result() if masks is not None else None)

    def _start_masks(self, sampling: list[Sequence], verify: VerifyRows | None = None,
                     ) -> Future[GrammarMask | None] | None:
        """The constrained rows' token masks, filled on the mask thread while the step's forward runs (the
        grammars have taken every token recorded so far; none moves until this step is recorded). A verifying
        step has a row per draft as well."""
        grammars = [seq.grammar for seq in sampling]
        if all(grammar is None for grammar in grammars):
            return None
        if self._masks is None:
            self._masks = MaskFiller(self.grammars.vocab_size)
        return self._mask_thread.submit(self._masks.fill, grammars, verify.drafts if verify is not None else None)

    def _propose(self, scheduled: SchedulerOutput, aux_hidden: torch.Tensor | None) -> None:
        """Drafts for the next step, from what this one computed (the speculator's proposer)."""
        assert self.speculator is not None
        chunks = scheduled.chunks
        kept = [0 if c.seq.is_finished else c.seq.num_computed - c.start for c in chunks]
        finished = frozenset(c.seq.request_id for c in chunks if c.seq.is_finished)
        self.speculator.after_step(StepRows(chunks, kept, aux_hidden, finished), self.scheduler.running)

    def finish_stopped(self, request_ids: Seq[str]) -> None:
        """End the requests the output processor found a stop string in (already reported finished): their
        blocks go back now; a token the core made after the stop is never reported."""
        for rid in request_ids:
            seq = self._requests.get(rid)
            if seq is not None:
                self._end(seq, "stop")

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        **options: Unpack[RequestOptions],
    ) -> list[RequestOutput]:
        """Run a batch to completion: one final output per prompt, in order (a prompt whose params ask for n
        choices gives n, by index). Requests already queued with add_request advance alongside; their outputs are
        not among those returned."""
        batch = _prompt_batch(prompts)
        per_prompt = list(params) if isinstance(params, Seq) else [params] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(batch)} prompts")
        if options.get("request_id") is not None and len(batch) > 1:
            raise ValueError(f"request_id {options['request_id']!r} names one request, not {len(batch)} prompts")
        pairs = zip(batch, per_prompt, strict=True)
        requests = [self.prepare(p, sp, **options) for p, sp in pairs]
        for request in requests:
            self.submit(request)
        wanted = [(r.seq.request_id, i) for r in requests for i in range(r.seq.params.n)]
        ours = set(wanted)
        final: dict[tuple[str, int], RequestOutput] = {}

        def keep(outputs: list[RequestOutput]) -> None:  # on the output thread
            final.update(((out.request_id, out.index), out) for out in outputs
                         if out.finished and (out.request_id, out.index) in ours)

        pipeline = StepPipeline(self, keep)  # the text side of each step beside the next step's compute
        try:
            while len(final) < len(wanted) and self.has_unfinished():
                pipeline.step()
        finally:
            pipeline.close()
        return [final[key] for key in wanted]

    # --- internals ----------------------------------------------------------------------------------
    def _record(self, sampling: list[Sequence], tokens: list[int], logprobs_per_row: list[TokenLogprobs | None],
                scored: Seq[ScoredPrompt] = ()) -> list[CoreOutput]:
        """The prompt tokens scored and the sampled tokens appended (a first token carries its prompt's scores),
        the finishes they make; the aborted requests' ends reported."""
        prompt_logprobs.record(scored)
        outputs = [self._core_output(seq, []) for seq in self._aborted]
        self._aborted.clear()
        now = time.time_ns()
        for seq, token, logprobs in zip(sampling, tokens, logprobs_per_row, strict=True):
            seq.output_ids.append(token)
            seq.first_token_ns = seq.first_token_ns or now
            if logprobs is not None:
                seq.cumulative_logprob += logprobs.logprob
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._end(seq, reason)
            outputs.append(self._core_output(seq, [token], [logprobs] if logprobs is not None else None))
        return outputs

    def _record_verified(self, sampling: list[Sequence], verify: VerifyRows, tokens: list[int],
                         logprobs_per_row: list[TokenLogprobs | None], scored: Seq[ScoredPrompt] = (),
                         ) -> list[CoreOutput]:
        """_record for a step that verified drafts: each sequence outputs its accepted drafts and the sample after
        them, up to the first that finishes it; its KV keeps the accepted drafts' entries and drops the rest."""
        prompt_logprobs.record(scored)
        outputs = [self._core_output(seq, []) for seq in self._aborted]
        self._aborted.clear()
        now = time.time_ns()
        assert self.speculator is not None
        for seq, start, drafts in zip(sampling, verify.starts, verify.drafts, strict=True):
            sampled = tokens[start : start + len(drafts) + 1]
            accepted = accepted_count(drafts, sampled)
            if drafts:
                seq.draft_tokens += len(drafts)
                seq.accepted_tokens += accepted
                seq.verify_steps += 1
                self._draft_tokens += len(drafts)
                self._accepted_tokens += accepted
                self.speculator.record(seq, len(drafts), accepted)
            new: list[int] = []
            new_logprobs: list[TokenLogprobs] = []
            reason = None
            for token, logprobs in zip(sampled[: accepted + 1], logprobs_per_row[start : start + accepted + 1],
                                       strict=True):
                seq.output_ids.append(token)
                new.append(token)
                if logprobs is not None:
                    seq.cumulative_logprob += logprobs.logprob
                    new_logprobs.append(logprobs)
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    break
            seq.first_token_ns = seq.first_token_ns or now
            if drafts:  # before any end, so the prefix cache keeps what plain decoding would have computed
                self.scheduler.accept_drafts(seq, len(new) - 1)
            if reason is not None:
                self._end(seq, reason)
            outputs.append(self._core_output(seq, new, new_logprobs))
        return outputs

    def _step_failed(self, scheduled: SchedulerOutput, err: HerdError) -> list[CoreOutput]:
        """A synchronous step's forward raised err. Within a hold (herd.engine.fault_hold) its requests are kept as
        they stood before it: the scheduler is not told the step ran, so the next schedule gives its sequences the
        same positions again (blocks allocated for them kept, nothing computed, cached or sampled), after a pause so
        that a dead shard is not retried in a spin. Otherwise they end with the error."""
        final = self.faults.on_failure(err)
        if final is not None:
            return self._fail(scheduled, final)
        time.sleep(self.config.fault_retry_interval_s)
        outputs = [self._core_output(seq, []) for seq in self._aborted]
        self._aborted.clear()
        return outputs

    def _fail(self, scheduled: SchedulerOutput, err: HerdError) -> list[CoreOutput]:
        """The step's work is lost (an expert shard unreachable, a deadline missed, ...): its requests end with
        the error (within their deadline, never a hang) and give back their blocks; others carry on."""
        outputs = [self._core_output(seq, []) for seq in self._aborted]
        self._aborted.clear()
        for seq in (member for chunk in scheduled.chunks for member in _with_choices(chunk.seq, self._groups)):
            if seq.request_id in self._requests:
                seq.error = err
                self._end(seq, "error")
                outputs.append(self._core_output(seq, []))
        return outputs

    def _hold_overlapped(self, scheduled: SchedulerOutput, registered: list[CachedBlock]) -> list[CoreOutput]:
        """An overlapped step failed within a hold. It was counted done and the next step scheduled on it, so its
        sequences (and their choices) are computed again from their tokens (preemption by recompute: the same
        positions, nothing was sampled), as is any sequence the next schedule admitted onto blocks it filled (they
        leave the prefix cache); after a pause, so that a dead shard is not retried in a spin."""
        dropped = self.kv.uncache(registered)
        assert self._next is not None
        failed = {id(m) for chunk in scheduled.chunks for m in _with_choices(chunk.seq, self._groups)}
        for seq in [s for s in self.scheduler.running
                    if id(s) in failed or (dropped and self.kv.holds_any(s, dropped))]:
            self.scheduler.recompute(seq, self._next)
        time.sleep(self.config.fault_retry_interval_s)
        outputs = [self._core_output(seq, []) for seq in self._aborted]
        self._aborted.clear()
        return outputs

    def _fail_overlapped(self, scheduled: SchedulerOutput, registered: list[CachedBlock], err: HerdError,
                         ) -> list[CoreOutput]:
        """An overlapped step's forward raised err after the step was counted done: the blocks it filled were
        registered in the prefix cache with KV never (fully) written. They leave the cache, the step's requests end
        with err, and a sequence the next schedule admitted with a prefix hit on one of them is computed again."""
        dropped = self.kv.uncache(registered)
        outputs = self._fail(scheduled, err)
        assert self._next is not None
        for seq in [s for s in self.scheduler.running if dropped and self.kv.holds_any(s, dropped)]:
            self.scheduler.recompute(seq, self._next)
        return outputs

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finish an unfinished sequence: its blocks go back, it leaves the engine's requests (and its group)."""
        self.scheduler.finish(seq, reason)
        del self._requests[seq.request_id]
        self._groups.forget(seq)
        if self.speculator is not None:
            self.speculator.forget(seq)
        if not self._requests:
            self.faults.on_idle()  # nothing left held: a later failure begins a hold of its own

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        """The finishes that decide the next batch (stop strings are the output processor's). A constrained
        sequence stops once its constraint is complete."""
        if token in seq.stop_ids:
            return "stop"
        if seq.grammar is not None:
            if not seq.grammar.accept(token):
                seq.error = HerdError(Code.INTERNAL, "the output left its structured constraint: "
                                                     f"{seq.grammar.error[:200]}")
                return "error"
            if seq.grammar.complete:
                return "stop"
        if seq.num_known >= seq.token_limit:  # max_tokens or the context limit
            return "length"
        return None

    @staticmethod
    def _core_output(seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs] | None = None) -> CoreOutput:
        return CoreOutput(
            request_id=seq.request_id, new_token_ids=tokens,
            new_logprobs=logprobs if logprobs and seq.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs.delivered(seq) if tokens and seq.prompt_logprobs is not None else None,
            finish_reason=seq.finish_reason, error=seq.error, num_cached_tokens=seq.num_cached_prompt_tokens,
            cumulative_logprob=seq.cumulative_logprob
            if seq.params.logprobs is not None or seq.params.ranks_candidates else None,
            scheduled_ns=seq.scheduled_ns, first_token_ns=seq.first_token_ns, finished_ns=seq.finished_ns,
            draft_tokens=seq.draft_tokens, accepted_tokens=seq.accepted_tokens, verify_steps=seq.verify_steps,
        )

    def _encode_images(self, ids: list[int], images: Seq[ImageInput]) -> PromptImages:
        """Each image's features [N_i*F, H], placed on the prompt's placeholders in order."""
        placeholder = self.model.config.image_token_id
        if self.vision is None or placeholder is None:
            raise ValueError("this model takes no images (its checkpoint has no vision tower)")
        for index, image in enumerate(images):
            if not isinstance(image, ImageInput):
                raise ValueError(f"image {index} must be an ImageInput, got {type(image).__name__}")
        features = [self.vision.image_features(image.pixel_values).flatten(0, 1) for image in images]
        return PromptImages.place(ids, placeholder, features, [pixel_digest(image.pixel_values) for image in images])


def _prompt_batch(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or a sequence of them, as a list; ValueError for an item that is neither."""
    if isinstance(prompts, str) or is_token_list(prompts):
        return [prompts]
    return [as_prompt(prompt) for prompt in prompts]


def _with_choices(seq: Sequence, groups: RequestGroups) -> list[Sequence]:
    """seq, and when its prompt is what failed to compute, every choice of its request, forked or not (none has
    a token or a valid KV cache yet)."""
    if seq.index == 0 and not seq.output_ids:
        return groups.members(seq.request_id) or [seq]
    return [seq]


def _rows(logits: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    """The logits [S, V] each sampling sequence draws from: [B, V] as is, or rows of it repeated for the choices
    that sample their first token from their leader's row."""
    return logits if rows is None else logits[torch.tensor(rows, device=logits.device)]


def _histories(sampling: list[Sequence]) -> list[History | None]:
    """Each sampling sequence's tokens where its params penalise or bias them (copies: the engine appends to its
    lists while an overlapped step samples), None elsewhere."""
    return [History(seq.prompt_ids, tuple(seq.output_ids), seq.stop_ids, seq.bad_words)
            if needs_history(seq.params) else None for seq in sampling]
