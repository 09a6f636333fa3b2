"""A model replica without its hosting: the engine, the trunk, the experts, and herd.v1 messages in and out.

The Ray Serve deployment (herd.workers.serve_app) and the in-process backend both wrap this class.
It takes internal `GenerateRequest`s (token ids, checked by the gateway; encoded images, decoded and
tiled here off the event loop), streams `GenerateChunk`s,
reports health (engine and every expert shard), counts what it holds (for tests and metrics), and
drains: stops admitting, lets in-flight streams finish up to a timeout, then aborts the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TypeVar

import torch
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from herd.engine import AsyncLLMEngine, EngineConfig, LLMEngine, RequestOutput, SamplingParams
from herd.engine.errors import Code, HerdError
from herd.engine.outputs import RequestTimes
from herd.engine.prompt_images import ImageInput
from herd.engine.sampler import TokenLogprobs
from herd.engine.sampling_params import SamplingError
from herd.engine.trunk_group import TrunkGroup
from herd.model import load_model
from herd.model.image_prompts import ImagePrompts
from herd.model.tokenizer import Tokenizer
from herd.model.vision import load_vision_if_multimodal
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.collective import CollectiveGroup
from herd.workers.collective_transport import CollectiveTransport
from herd.workers.dispatch import ExpertDispatcher, PlacementMover
from herd.workers.expert_balancer import ExpertBalancer
from herd.workers.expert_load import CountingExperts, ExpertLoad
from herd.workers.placement import place_experts
from herd.workers.replica_adapters import ReplicaAdapters
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_metrics import ReplicaMetrics
from herd.workers.shard_experts import ShardExperts
from herd.workers.structured_options import structured_output
from herd.workers.transport import ExpertTransport, InProcessTransport

tracer = trace.get_tracer("herd.workers.replica")

MESSAGE_SPACING_S = 0.005
"""A replica's streams together send about one message per this many seconds: each message costs a fixed
share of a millisecond of CPU (Ray Serve's item on both sides, the gateway's SSE event, the client's parse),
so with N streams in flight each waits N times this between messages (32 streams: 160 ms, 8: 40 ms, below
stream_interval_s's 50 ms default) and the serving overhead stays a bounded share of the cores."""


T = TypeVar("T")

TransportFactory = Callable[[list[tuple[int, ...]]], ExpertTransport | list[ExpertTransport]]
"""Given each shard's experts, bring the shards up (processes, actors, ...) and return their transport (with
several trunks, each trunk's, trunk 0's first)."""


class ReplicaCore:
    """Engine + trunk + experts of one replica."""

    def __init__(self, config: ReplicaConfig, transport_factory: TransportFactory | None = None, *,
                 step_sample_ratio: float = 0.0) -> None:
        """`step_sample_ratio`: engine steps traced (a span per step, its MoE layers' dispatches and the shards'
        compute inside), when tracing is configured in the process."""
        self.config = config
        self.step_sample_ratio = step_sample_ratio
        self.created = int(time.time())
        self.tokenizer = Tokenizer.from_pretrained(config.path)
        engine_config = config.engine
        self.dispatcher: ExpertDispatcher | None = None
        """Trunk 0's dispatcher (the one that controls the shards: health, pauses, adapters, balancing)."""
        self.dispatchers: list[ExpertDispatcher] = []
        """Every trunk's, trunk 0's first."""
        experts = None if config.shards == 0 else ()
        models = [load_model(config.path, experts=experts, dtype=engine_config.dtype,
                             device=trunk_device(engine_config.device, trunk), progress=False)
                  for trunk in range(config.trunks)]
        model = models[0]
        self.expert_load = ExpertLoad(model.config.num_local_experts)
        observe = self._observe_dispatch
        if config.shards == 0:
            model.set_experts_executor(CountingExperts(model, self.expert_load, observe))
        else:
            placement = place_experts(model.config.num_local_experts, config.shards)
            factory = transport_factory or self._in_process_transport
            made = factory(list(placement.shard_experts))
            transports = made if isinstance(made, list) else [made]
            if len(transports) != len(models):
                raise ValueError(f"model {config.name}: {len(transports)} transports for {len(models)} trunks")
            for trunk, transport in zip(models, transports, strict=True):
                dispatcher = ExpertDispatcher(placement, transport, load=self.expert_load, observe_s=observe)
                dispatcher.attach(trunk)
                self.dispatchers.append(dispatcher)
            self.dispatcher = self.dispatchers[0]
        vision = load_vision_if_multimodal(config.path, dtype=engine_config.dtype, device=engine_config.device)
        self.image_prompts = ImagePrompts.from_pretrained(config.path)
        engines = [LLMEngine(trunk, self.tokenizer, engine_config, vision=vision) for trunk in models]
        engine: LLMEngine | TrunkGroup = engines[0] if len(engines) == 1 else TrunkGroup(
            engines, links=self._trunk_links() if engine_config.context_parallel > 1 else None,
            timeout_s=config.dispatch_timeout_s)
        self.metrics = ReplicaMetrics(config.name, engine, self.expert_load)
        self.balancer: ExpertBalancer | None = None
        if config.balance.enabled:
            if self.dispatcher is None or not isinstance(self.dispatcher.transport, PlacementMover):
                raise ValueError(f"model {config.name}: balance.enabled needs expert shards over the collective "
                                 "transport (shards > 0, transport collective or auto on one node)")
            self.balancer = ExpertBalancer(self.dispatcher, config.balance, model.config.moe_layers,
                                           on_replace=lambda _: self.metrics.replacements.inc())
        self.engine = AsyncLLMEngine(engine, step_scope=self._step_scope)
        loras = engine_config.max_loras
        self.adapters = (ReplicaAdapters(self.engine, max_registered=engine_config.max_cpu_loras or 4 * loras)
                         if loras else None)
        self._spans: dict[str, trace.SpanContext] = {}  # request id -> its replica span (steps link to them)
        self._draining = False
        self._in_flight = 0
        self._step_lock = threading.Lock()  # held by every engine step (_step_scope); between_steps takes it too

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def model_card(self) -> pb.ModelCard:
        return pb.ModelCard(id=self.config.name, root=self.config.path, max_model_len=self.max_model_len,
                            created=self.created)

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateChunk, None]:
        """Stream the request's chunks; HerdError for what cannot be served."""
        if self._draining:
            raise HerdError(Code.UNAVAILABLE, f"replica of {self.config.name} is shutting down")
        params, prompt = self._unpack(request)
        images = await asyncio.to_thread(self._images, request) if request.images else ()
        tenant = request.tenant
        span = tracer.start_span("herd.replica.generate", context=propagate.extract(dict(request.trace_context)),
                                 kind=SpanKind.SERVER, attributes={"herd.request_id": request.request_id,
                                                                   "gen_ai.request.model": self.config.name,
                                                                   "herd.tenant": tenant.tenant_id})
        self._spans[request.request_id] = span.get_span_context()
        self._in_flight += 1
        try:
            async with self._adapter(request) as adapter:  # registered, and kept until the stream ends
                stream = self.engine.generate(
                    prompt, params, request_id=request.request_id or None,
                    tenant_id=tenant.tenant_id or "default", tenant_weight=tenant.weight or 1.0,
                    sharing_group=tenant.sharing_group or None, images=images, adapter=adapter,
                )
                echo = self.tokenizer.decode(prompt, skip_special_tokens=True) if request.sampling.echo else ""
                chunks = merged_chunks(stream, self._stream_interval_s, self._piece,
                                       check=functools.partial(self._check, span), echo=echo)
                async with contextlib.aclosing(stream), contextlib.aclosing(chunks):  # aborts it, frees its blocks
                    async for chunk in chunks:
                        yield chunk
        except ValueError as err:  # the engine's refusal; a SamplingError names the field (n past max_num_seqs)
            span.set_status(Status(StatusCode.ERROR, str(err)))
            field = err.field if isinstance(err, SamplingError) else None
            raise HerdError(Code.INVALID_ARGUMENT, str(err), param=field) from err
        except HerdError as err:
            span.set_status(Status(StatusCode.ERROR, err.message))
            raise
        finally:
            self._in_flight -= 1
            self._spans.pop(request.request_id, None)
            span.end()

    def _adapter(self, request: pb.GenerateRequest) -> contextlib.AbstractAsyncContextManager[str | None]:
        """The request's LoRA adapter (registered here on first use, leased while the request runs), or None."""
        if not request.HasField("adapter"):
            return contextlib.nullcontext(None)
        if self.adapters is None:
            raise HerdError(Code.INVALID_ARGUMENT, f"model {self.config.name} serves no LoRA adapters "
                            "(engine.max_loras is 0)")
        return self.adapters.lease(request.adapter.name, request.adapter.path)

    def _check(self, span: trace.Span, out: RequestOutput) -> None:
        """Each engine output as it comes: the finished one's phases recorded (the first choice's: one request)
        and each finished choice's speculative decoding, a failed step raised."""
        if out.finished:
            self.metrics.speculative.finished(out)
        if out.times is not None and out.index == 0:
            self._finished(span, out.times)
        if out.finish_reason == "error":
            raise out.error or HerdError(Code.INTERNAL, "the engine step failed")

    def _stream_interval_s(self) -> float:
        return stream_interval_s(self.config.stream_interval_s, self._in_flight)

    def _finished(self, span: trace.Span, times: RequestTimes) -> None:
        """The request's phases in the engine, as metrics and as child spans of its replica span."""
        self.metrics.finished(times)
        if not span.is_recording():
            return
        parent = trace.set_span_in_context(span)
        phases = (("herd.engine.queue", times.arrived_ns, times.scheduled_ns),
                  ("herd.engine.prefill", times.scheduled_ns, times.first_token_ns),
                  ("herd.engine.decode", times.first_token_ns, times.finished_ns))
        for name, start, end in phases:
            if start and end:
                tracer.start_span(name, context=parent, start_time=start).end(end_time=end)

    @contextlib.contextmanager
    def _step_scope(self) -> Iterator[None]:
        """Around an engine step, on the engine's thread: a sampled step is a span (current, so the expert
        dispatches inside are its children), linked to the requests the replica is serving. Expert balancing
        looks here too, before the step: between two steps, on the thread that runs them."""
        with self._step_lock:
            if self.balancer is not None:
                self.balancer.between_steps()
            if not self.step_sample_ratio or random.random() >= self.step_sample_ratio:
                yield
                return
            links = [Link(c) for c in list(self._spans.values()) if c.is_valid]
            with tracer.start_as_current_span("herd.engine.step", links=links[:32],
                                              attributes={"herd.requests": len(self._spans)}):
                yield

    def between_steps(self, fn: Callable[[], T]) -> T:
        """fn() while no engine step runs (from another thread than the engine's: a shard's recovery)."""
        with self._step_lock:
            return fn()

    def _observe_dispatch(self, seconds: float) -> None:
        self.metrics.dispatch.observe(seconds)

    def engine_config(self) -> EngineConfig:
        """The config the engine runs with (as it received it)."""
        return self.engine.engine.config

    def healthy(self) -> bool:
        return not self._draining and all(dispatcher.healthy() for dispatcher in self.dispatchers)

    def stats(self) -> dict[str, int]:
        """What the replica holds now: requests, KV blocks in use per group and in all (kv_blocks_held), and each
        group's blocks (kv_blocks_total_<group>)."""
        engine = self.engine.engine.stats()
        used = {f"kv_blocks_used_{g}": n for g, n in engine.kv_blocks_used.items()}
        total = {f"kv_blocks_total_{g}": n for g, n in engine.kv_blocks.items()}
        return {"in_flight": self._in_flight, "running": engine.running, "waiting": engine.waiting, **used, **total,
                "kv_blocks_held": engine.kv_blocks_held}

    async def drain(self) -> None:
        """Stop admitting; wait for in-flight streams up to drain_timeout_s; abort what is left."""
        self._draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.engine.abort_all()
        for dispatcher in reversed(self.dispatchers):  # trunk 0, which tells the shards to stop, last
            dispatcher.transport.close()

    def _unpack(self, request: pb.GenerateRequest) -> tuple[SamplingParams, list[int]]:
        if request.WhichOneof("prompt") != "token_ids":
            raise HerdError(Code.INVALID_ARGUMENT, "a replica takes token ids (the gateway tokenizes)")
        options = request.sampling
        try:
            params = SamplingParams(
                max_tokens=options.max_tokens if options.HasField("max_tokens") else 16,
                temperature=options.temperature if options.HasField("temperature") else 1.0,
                top_p=options.top_p if options.HasField("top_p") else 1.0,
                top_k=options.top_k if options.HasField("top_k") else 0,
                min_p=options.min_p if options.HasField("min_p") else 0.0,
                seed=options.seed if options.HasField("seed") else None,
                stop=tuple(options.stop),
                stop_token_ids=tuple(options.stop_token_ids),
                logprobs=options.logprobs if options.HasField("logprobs") else None,
                ignore_eos=options.ignore_eos,
                presence_penalty=options.presence_penalty if options.HasField("presence_penalty") else 0.0,
                frequency_penalty=options.frequency_penalty if options.HasField("frequency_penalty") else 0.0,
                repetition_penalty=options.repetition_penalty if options.HasField("repetition_penalty") else 1.0,
                logit_bias=tuple(options.logit_bias.items()),
                min_tokens=options.min_tokens if options.HasField("min_tokens") else 0,
                bad_words=tuple(options.bad_words),
                structured=structured_output(options),
                prompt_logprobs=options.prompt_logprobs if options.HasField("prompt_logprobs") else None,
                n=options.n if options.HasField("n") else 1,
                best_of=options.best_of if options.HasField("best_of") else None,
                speculative=options.speculative if options.HasField("speculative") else True,
                output_offset=options.output_offset,
            )
        except SamplingError as err:
            raise HerdError(Code.INVALID_ARGUMENT, str(err), param=err.field) from err
        except ValueError as err:
            raise HerdError(Code.INVALID_ARGUMENT, str(err)) from err
        return params, list(request.token_ids.ids)

    def _images(self, request: pb.GenerateRequest) -> list[ImageInput]:
        """Each encoded image of the request, decoded and tiled as the gateway counted it."""
        if self.image_prompts is None:
            raise HerdError(Code.INVALID_ARGUMENT, f"model {self.config.name} takes no images (text only)")
        images = []
        for index, data in enumerate(request.images):
            try:
                images.append(ImageInput(self.image_prompts.pixel_values(data)))
            except ValueError as err:
                raise HerdError(Code.INVALID_ARGUMENT, f"image {index}: {err}") from err
        return images

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _trunk_links(self) -> list[CollectiveGroup]:
        """Each trunk's collective group (ranks 0..M-1 are the trunks): the link their global layers' exchange
        takes (context parallelism, herd.engine.context_parallel)."""
        groups = [d.transport.group for d in self.dispatchers if isinstance(d.transport, CollectiveTransport)]
        if len(groups) != self.config.trunks:
            raise ValueError(f"model {self.config.name}: context parallelism links the trunks over the collective "
                             "transport's group")
        return groups

    def _in_process_transport(self, shard_experts: list[tuple[int, ...]]) -> ExpertTransport:
        engine = self.config.engine
        return InProcessTransport([ShardExperts.load(self.config.path, experts, dtype=engine.dtype,
                                                     device=engine.device) for experts in shard_experts])


def trunk_device(device: str, trunk: int) -> str:
    """Where trunk `trunk` of a replica runs: on CUDA its own GPU of the replica's (cuda:<trunk> unless the setting
    names one, which the first trunk alone may), elsewhere the device as set."""
    if trunk == 0 or torch.device(device).type != "cuda":
        return device
    if torch.device(device).index is not None:
        raise ValueError(f"engine.device {device!r} names one GPU; several trunks take cuda:0..cuda:M-1 (set 'cuda')")
    return f"cuda:{trunk}"


def stream_interval_s(base_s: float, streams: int) -> float:
    """How long each of `streams` streams waits between messages: `base_s` (stream_interval_s), stretched so
    that together they send about one message per MESSAGE_SPACING_S; 0 stays 0 (every step, uncapped)."""
    return max(base_s, streams * MESSAGE_SPACING_S) if base_s else 0.0


class _Pending:
    """What a stream has not sent yet: the text, tokens and logprobs of the outputs since its last message (the
    first message's also the echoed prompt text and the prompt's logprobs)."""

    __slots__ = ("logprobs", "prompt", "prompt_logprobs", "text", "token_ids")

    def __init__(self, echo: str = "") -> None:
        self.text: list[str] = [echo] if echo else []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.prompt: list[int] = []
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.delta_text)
        self.token_ids += out.delta_token_ids
        if out.logprobs is not None:
            self.logprobs += out.logprobs[len(out.token_ids) - len(out.delta_token_ids):]

    def chunk(self, last: RequestOutput, piece: Callable[[int], str]) -> pb.GenerateChunk:
        """One message with all of it, and `last`'s ending (finish reason, usage) when it finished. Usage is per
        choice: the request's prompt (counted once, whichever choice carries it) and this choice's tokens."""
        chunk = pb.GenerateChunk(request_id=last.request_id, text="".join(self.text), token_ids=self.token_ids,
                                 index=last.index)
        chunk.logprobs.extend(_token_logprob(lp, piece) for lp in self.logprobs)
        if self.prompt_logprobs is not None:  # the first prompt token has none: only its token (see the proto)
            chunk.prompt_logprobs.extend(
                _token_logprob(lp, piece) if lp is not None else pb.TokenLogprob(token_id=t, token=piece(t))
                for t, lp in zip(self.prompt, self.prompt_logprobs, strict=True))
        if last.finished:
            chunk.finish_reason = last.finish_reason or ""
            chunk.usage.CopyFrom(pb.Usage(prompt_tokens=len(last.prompt_token_ids),
                                          completion_tokens=len(last.token_ids), cached_tokens=last.num_cached_tokens))
        return chunk


def _token_logprob(lp: TokenLogprobs, piece: Callable[[int], str]) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, token=piece(lp.token_id), logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, token=piece(t), logprob=v) for t, v in lp.top])


async def merged_chunks(outputs: AsyncIterator[RequestOutput], interval_s: Callable[[], float],
                        piece: Callable[[int], str], *, check: Callable[[RequestOutput], None] = lambda _: None,
                        clock: Callable[[], float] = time.monotonic, echo: str = "",
                        ) -> AsyncGenerator[pb.GenerateChunk, None]:
    """A request's outputs as GenerateChunks: for each choice (by index), the first at once, then one per
    `interval_s()` seconds with everything that came meanwhile, and the last (finished) at once. Each message is
    built once, from the outputs it carries (`piece` spells a logprob's token); `check` sees every output first
    (and may raise). Each choice's first message's text starts with `echo` (the prompt's text, when the request
    asks for it); the prompt's logprobs go out once per choice, in its first message after the engine delivers
    them (with the first token; the prompt is scored once, for all the choices)."""
    pending: dict[int, _Pending] = {}
    sent_at: dict[int, float] = {}
    scored: tuple[list[int], list[TokenLogprobs | None]] | None = None
    given: set[int] = set()  # choices whose prompt logprobs are out
    async for out in outputs:
        check(out)
        if scored is None and out.prompt_logprobs is not None:
            scored = (out.prompt_token_ids, out.prompt_logprobs)
        choice = pending.setdefault(out.index, _Pending(echo))
        choice.add(out)
        if scored is not None and out.index not in given:
            choice.prompt, choice.prompt_logprobs = scored
            given.add(out.index)
        now = clock()
        last = sent_at.get(out.index)
        if out.finished or last is None or now - last >= interval_s():
            yield choice.chunk(out, piece)
            pending[out.index], sent_at[out.index] = _Pending(), now
