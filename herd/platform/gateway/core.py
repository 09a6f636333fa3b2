"""The gateway: one request path behind the HTTP and gRPC front doors.

Both doors turn their request into the same internal herd.v1 GenerateRequest here: the prompt rendered
(chat) and tokenized, its images' grids read from their headers and their placeholder tokens put in
the prompt (so image tokens are counted and checked like text), its length checked against the model's
context, max_tokens defaulted or refused, the tenant context attached. The stream that comes back is
the same for both; refusals are HerdErrors (herd.platform.gateway.errors builds them).

A model named `<model>:<adapter>` is a LoRA adapter granted to the caller's tenant (herd.platform.tenancy): the
request runs on the base model's backend with the adapter attached; an adapter the tenant was not granted is
answered as a model that does not exist (404), as is any name without tenancy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.context import Context
from prometheus_client import CollectorRegistry

from herd.engine.errors import Code, HerdError
from herd.model.chat_prompt import chat_ids
from herd.model.image_processor import TileGrid
from herd.model.prompt import prompt_ids
from herd.platform.gateway.backend import Backend
from herd.platform.gateway.cold_start import ColdStartPolicy, wait_for_replica
from herd.platform.gateway.continuation import Progress, replica_lost
from herd.platform.gateway.errors import (
    context_length_exceeded,
    deadline_exceeded,
    invalid_request,
    model_not_found,
    too_many_images,
)
from herd.platform.gateway.load import LoadTracker
from herd.platform.gateway.sampling_limits import candidates, check_sampling
from herd.platform.telemetry.gateway_metrics import GatewayMetrics
from herd.platform.telemetry.request_telemetry import RequestTelemetry
from herd.platform.tenancy.adapters import AdapterRef, split_model
from herd.protos.herd.v1 import inference_pb2 as pb

ImageLoader = Callable[[str], Awaitable[bytes]]
"""Reads an image URL's bytes (the HTTP door's policy: data: URLs, and http(s) where allowed)."""


class AdmissionGuard(Protocol):
    """Tenancy as the gateway sees it (herd.platform.tenancy.guard.Guard): who, what, and whether now."""

    async def authenticate(self, credential: str | None) -> Any: ...

    def authorize(self, identity: Any, model: str) -> None: ...

    def allowed_models(self, identity: Any, models: list[str]) -> list[str]: ...

    def adapters(self, identity: Any) -> Mapping[str, AdapterRef]:
        """The LoRA adapters the caller may use, by public name (<model>:<adapter>)."""
        ...

    def context(self, identity: Any) -> pb.TenantContext: ...

    async def enter(self, identity: Any, model: str, request_id: str, *, choices: int = 1,
                    adapter: str | None = None) -> Any: ...

    async def reserve(self, admission: Any, prompt_tokens: int, max_tokens: int, *,
                      max_tokens_given: bool = True) -> None: ...

    async def settle(self, admission: Any, *, completion_tokens: int, cached_tokens: int, status: str) -> None: ...


class ControlPlaneView(Protocol):
    """A control plane this process runs (herd.platform.controlplane.loop.ControlPlane), as the HTTP door shows it."""

    @property
    def registry(self) -> CollectorRegistry: ...

    async def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Prepared:
    """A checked request and what the front door needs to answer it."""

    backend: Backend
    request: pb.GenerateRequest
    prompt_tokens: int
    identity: Any = None
    admission: Any = None  # the guard's, settled when the request's stream ends


@dataclass(frozen=True)
class Ticket:
    """A request let in before any expensive work: its model's backend, its caller, its id, its admission."""

    backend: Backend
    identity: Any
    request_id: str
    admission: Any = None
    adapter: AdapterRef | None = None


class Gateway:
    """Models by name, and the shared checks of every request."""

    def __init__(
        self, backends: Mapping[str, Backend], *, guard: AdmissionGuard | None = None, request_timeout_s: float = 600.0,
        cold_start: Mapping[str, ColdStartPolicy] | None = None, log_prompts: bool = False,
        max_images_per_request: int = 8, max_image_bytes: int = 20 * 2**20, migration_attempts: int = 2,
    ) -> None:
        """`migration_attempts`: how many times a request whose replica died is sent again (continued from the
        tokens it streamed; herd.platform.gateway.continuation) before it fails."""
        self.backends = dict(backends)
        self.migration_attempts = migration_attempts
        self.max_images_per_request = max_images_per_request
        self.max_image_bytes = max_image_bytes
        self.guard = guard
        self.request_timeout_s = request_timeout_s
        self.cold_start = dict(cold_start or {})  # per model; ColdStartPolicy() where not given
        self.load = LoadTracker()
        self.telemetry = RequestTelemetry(GatewayMetrics(self.load), log_prompts=log_prompts)
        self.control_plane: ControlPlaneView | None = None  # set by herd serve when it runs one
        self.in_flight = 0  # requests between admission and their end
        self._closing = False
        self._interrupts: set[asyncio.Future[None]] = set()  # one per request in flight; resolved by interrupt()

    def begin_shutdown(self) -> None:
        """From now on a new request is refused (503, retry elsewhere); those in flight go on."""
        self._closing = True

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the requests in flight to end; True when none is left."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.in_flight

    def interrupt(self) -> None:
        """End every request in flight now: each stream ends with an `interrupted` error and is settled
        (its usage row written) for the tokens it streamed."""
        self._closing = True
        for waiter in self._interrupts:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def closing(self) -> bool:
        """Shutting down: new requests are refused."""
        return self._closing

    def _check_open(self) -> None:
        if self._closing:
            raise HerdError(Code.UNAVAILABLE, "the server is shutting down; retry the request", reason="shutting_down",
                            retry_after_s=1)

    async def identify(self, credential: str | None) -> Any:
        """The caller's identity from its API key (None when the gateway runs without tenancy)."""
        with self._counting_rejections():
            return None if self.guard is None else await self.guard.authenticate(credential)

    @contextlib.contextmanager
    def _counting_rejections(self) -> Iterator[None]:
        """A refusal before a request reaches a model is counted by its code, then re-raised."""
        try:
            yield
        except HerdError as err:
            self.telemetry.metrics.rejected.labels(err.code.value).inc()
            raise

    def resolve(self, model: str, identity: Any = None) -> tuple[Backend, AdapterRef | None]:
        """The backend of `model` and, for `<model>:<adapter>`, the adapter: 404 for one the caller's tenant was
        not granted (or without tenancy), 403/404 for its base model as for the base model itself."""
        base, adapter = split_model(model)
        if adapter is None or model in self.backends:
            return self.backend(model, identity), None
        ref = self.guard.adapters(identity).get(model) if self.guard is not None else None
        if ref is None:
            raise model_not_found(model, self._visible(identity))
        return self.backend(base, identity), ref

    def backend(self, model: str, identity: Any = None) -> Backend:
        visible = self._visible(identity)
        if model not in self.backends or (self.guard is not None and model not in visible):
            if self.guard is not None and model in self.backends:
                self.guard.authorize(identity, model)  # raises 403 without naming what else exists
            raise model_not_found(model, visible)
        return self.backends[model]

    def list_models(self, identity: Any = None) -> list[pb.ModelCard]:
        """The models the caller may use, each followed by the LoRA adapters of it granted to the caller."""
        cards = []
        granted = sorted(self.guard.adapters(identity).values(), key=lambda a: a.name) if self.guard else []
        for name in self._visible(identity):
            base = self.backends[name].card()
            cards.append(base)
            cards += [pb.ModelCard(id=a.public_name, root=base.root, max_model_len=base.max_model_len,
                                   created=base.created, parent=name) for a in granted if a.model == name]
        return cards

    def _visible(self, identity: Any) -> list[str]:
        names = sorted(self.backends)
        return names if self.guard is None else self.guard.allowed_models(identity, names)

    async def prepare_text(
        self,
        model: str,
        prompt: str | Sequence[int],
        options: pb.SamplingOptions,
        *,
        identity: Any = None,
        default_max_tokens: int | None = 16,
        request_id: str | None = None,
    ) -> Prepared:
        """A completion: text (given <|begin_of_text|> unless it starts with it) or token ids. The model is
        authorised first; tokenising runs off the event loop. `request_id`: the caller's own (a batch line's,
        the same on every attempt); else a new one."""
        async with self._admitted(model, identity, options, request_id) as ticket:
            tokenizer = ticket.backend.tokenizer
            try:
                ids = await asyncio.to_thread(prompt_ids, tokenizer, prompt, tokenizer.vocab_size)
            except ValueError as err:
                raise invalid_request(str(err), param="prompt") from err
            return await self._prepared(ticket, ids, options, default_max_tokens)

    async def prepare_chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        options: pb.SamplingOptions,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        identity: Any = None,
        load_image: ImageLoader | None = None,
        request_id: str | None = None,
    ) -> Prepared:
        """A chat: messages rendered in the Llama 4 format (with tools when given), then tokenized. An image
        part carries its bytes (`{"type": "image", "image": b"..."}`) or a URL (`{"type": "image_url", "url":
        ...}`) that `load_image` reads; URLs are read only after the model is authorised and the image count
        checked, so nothing is fetched for a request that would be refused anyway. Rendering and tokenizing run
        off the event loop. `request_id` as for prepare_text."""
        async with self._admitted(model, identity, options, request_id) as ticket:
            backend = ticket.backend
            if not messages:
                raise invalid_request("messages must not be empty", param="messages")
            messages = await self._load_images(backend, messages, load_image)
            images = self._images(backend, messages)
            ids = await asyncio.to_thread(self._chat_ids, backend, messages, tools, tool_choice, images)
            return await self._prepared(ticket, ids, options, None, images=[data for data, _ in images])

    @contextlib.asynccontextmanager
    async def _admitted(self, model: str, identity: Any, options: pb.SamplingOptions,
                        request_id: str | None = None) -> AsyncIterator[Ticket]:
        """Before any expensive work: the gateway open, the model authorised (403/404), the sampling limits met
        and the tenant let in (concurrency, request rate, budget: 429). A request refused or failed while it is
        prepared is settled at once (it was never reserved: no usage row); every refusal is counted."""
        with self._counting_rejections():
            self._check_open()
            backend, adapter = self.resolve(model, identity)
            check_sampling(options)
            request_id = request_id or f"herd-{uuid.uuid4().hex}"  # ours, never the client's: the ledger's key
            tenant = self.guard.context(identity).tenant_id if self.guard is not None else "default"
            admission = None
            try:
                if self.guard is not None:
                    admission = await self.guard.enter(identity, backend.name, request_id, choices=candidates(options),
                                                       adapter=adapter.name if adapter is not None else None)
                yield Ticket(backend, identity, request_id, admission, adapter)
            except BaseException as err:
                if admission is not None and self.guard is not None:
                    await self.guard.settle(admission, completion_tokens=0, cached_tokens=0, status="refused")
                if isinstance(err, HerdError):
                    self.telemetry.refused(model, tenant, request_id, err)
                raise

    @staticmethod
    def _chat_ids(backend: Backend, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                  tool_choice: Any, images: Sequence[tuple[bytes, TileGrid]]) -> list[int]:
        """The prompt's ids; the client's text stays text even where it spells a control token."""
        try:
            return chat_ids(backend.tokenizer, messages, tools=tools or None,
                            tool_choice=tool_choice if tools else None, image_prompts=backend.image_prompts,
                            grids=[grid for _, grid in images])
        except ValueError as err:
            raise invalid_request(str(err), param="messages") from err

    async def _load_images(self, backend: Backend, messages: Sequence[Mapping[str, Any]],
                           load_image: ImageLoader | None) -> list[Mapping[str, Any]]:
        """`messages` with every image_url part read into an image part (after the count is checked)."""
        parts = _parts(messages, "image", "image_url")
        if not parts:
            return list(messages)
        if backend.image_prompts is None:
            raise invalid_request(f"model {backend.name} takes no images (text only)", param="messages")
        if len(parts) > self.max_images_per_request:
            raise too_many_images(len(parts), self.max_images_per_request)
        if not any(part.get("type") == "image_url" for part in parts):
            return list(messages)
        if load_image is None:
            raise invalid_request("image URLs are not taken here; send the image's bytes", param="messages")
        loaded = []
        for m in messages:
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(m, Mapping) and _is_parts(content):
                assert isinstance(content, Sequence)
                m = {**m, "content": [
                    {"type": "image", "image": await load_image(str(p.get("url")))}
                    if isinstance(p, Mapping) and p.get("type") == "image_url" else p for p in content]}
            loaded.append(m)
        return loaded

    def _images(self, backend: Backend, messages: Sequence[Mapping[str, Any]]) -> list[tuple[bytes, TileGrid]]:
        """Every image part's bytes, in prompt order, with its tile grid (from the header only)."""
        found = [part.get("image") for part in _parts(messages, "image")]
        if not found:
            return []
        assert backend.image_prompts is not None  # _load_images refused images for a text-only model
        out = []
        for index, data in enumerate(found):
            if not isinstance(data, bytes) or not data:
                raise invalid_request(f"image {index} has no image bytes", param="messages")
            if len(data) > self.max_image_bytes:
                raise invalid_request(f"image {index} is {len(data)} bytes, over the limit of {self.max_image_bytes}",
                                      param="messages")
            try:
                out.append((data, backend.image_prompts.grid(data)))
            except ValueError as err:
                raise invalid_request(f"image {index}: {err}", param="messages") from err
        return out

    async def stream(self, prepared: Prepared, *, timeout_s: float | None = None,
                     trace_parent: Context | None = None) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The backend's chunks, within the deadline, after tenant admission and (for a model scaled to
        zero) a wait for its replica; leaving early aborts the request. With tenancy, every request ends in
        exactly one settlement (its usage row). Every request is one span (a child of `trace_parent`, the
        caller's trace context) and one set of metric samples. A request whose replica died (or could not be
        reached) is sent again, up to `migration_attempts` times within the same deadline, continued from the
        tokens it had streamed (herd.platform.gateway.continuation): the client's stream goes on where it stopped,
        and its usage counts each token once."""
        limit = min(timeout_s or self.request_timeout_s, self.request_timeout_s)
        deadline = time.monotonic() + limit
        request, model = prepared.request, prepared.request.model
        record = self.telemetry.start(request, prompt_tokens=prepared.prompt_tokens, tenant=request.tenant.tenant_id,
                                      parent=trace_parent, prompt_text=self._prompt_text(prepared))
        status, completion, cached, error = "cancelled", 0, 0, None
        reserved = prepared.prompt_tokens + candidates(request.sampling) * request.sampling.max_tokens
        admission, started, last_token_at = prepared.admission, None, None
        self.in_flight += 1
        interrupted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._interrupts.add(interrupted)
        try:
            self._check_open()
            started = time.monotonic()
            self.load.started(model, reserved)
            await wait_for_replica(prepared.backend, self.load, self.cold_start.get(model, ColdStartPolicy()),
                                   deadline=deadline)
            record.admitted()
            progress, attempt = Progress(request, prepared.backend.tokenizer), request
            while True:
                try:
                    async with contextlib.aclosing(prepared.backend.generate(attempt)) as chunks:
                        while not progress.cut:
                            try:
                                chunk = progress.relay(await self._next(chunks, interrupted,
                                                                        deadline - time.monotonic()))
                            except StopAsyncIteration:
                                break
                            except TimeoutError:
                                raise deadline_exceeded(limit) from None
                            except HerdError:
                                raise
                            except Exception:  # the backend failed (a bug, not a refusal): the door answers INTERNAL
                                status = "internal"
                                raise
                            if chunk.token_ids:
                                now = time.monotonic()
                                if not completion:
                                    self.load.first_token(model, now - started)
                                self.load.output(model, len(chunk.token_ids),
                                                 since_last_s=None if last_token_at is None else now - last_token_at)
                                last_token_at = now
                            completion += len(chunk.token_ids)
                            record.tokens(len(chunk.token_ids))
                            if chunk.finish_reason:
                                cached = chunk.usage.cached_tokens
                            yield chunk
                    status = "ok"
                    return
                except HerdError as err:
                    if progress.finished and replica_lost(err):  # it went after the request's last chunk
                        status = "ok"
                        return
                    if not (replica_lost(err) and progress.attempts < self.migration_attempts
                            and progress.can_continue()):
                        raise
                attempt = progress.next_request()
                if progress.chunks and progress.remaining() <= 0:  # all its tokens were sent; only the end was not
                    chunk = progress.length_reached()
                    cached = chunk.usage.cached_tokens
                    yield chunk
                    status = "ok"
                    return
                self.telemetry.metrics.migrated.labels(model).inc()
                # The replica that died may have been the only one: held for its restart as a cold start is.
                await wait_for_replica(prepared.backend, self.load, self.cold_start.get(model, ColdStartPolicy()),
                                       deadline=deadline)
        except HerdError as err:
            status, error = ("interrupted" if err.reason == "interrupted" else err.code.value.lower()), err
            raise
        finally:
            self._interrupts.discard(interrupted)
            self.in_flight -= 1
            if started is not None:
                self.load.finished(model, reserved, answered=completion > 0)
            if admission is not None and self.guard is not None:
                await self.guard.settle(admission, completion_tokens=completion, cached_tokens=cached, status=status)
            record.end(status, completion_tokens=completion, cached_tokens=cached, error=error)

    @staticmethod
    async def _next(chunks: AsyncGenerator[pb.GenerateChunk, None], interrupted: asyncio.Future[Any],
                    remaining_s: float) -> pb.GenerateChunk:
        """The next chunk; TimeoutError past the deadline, an `interrupted` HerdError when the gateway stops."""
        if remaining_s <= 0:
            raise TimeoutError
        if interrupted.done():
            raise _interrupted()
        following = asyncio.ensure_future(anext(chunks))
        try:
            await asyncio.wait((following, interrupted), timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller's task was cancelled: stop the read before `chunks` is closed
            following.cancel()
            with contextlib.suppress(BaseException):
                await following
            raise
        if not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
            if interrupted.done():
                raise _interrupted()
            raise TimeoutError
        return following.result()

    def _prompt_text(self, prepared: Prepared) -> str | None:
        """The prompt as text, for a span, only when prompts may be recorded."""
        if not self.telemetry.log_prompts:
            return None
        return prepared.backend.tokenizer.decode(list(prepared.request.token_ids.ids), skip_special_tokens=False)

    async def _prepared(self, ticket: Ticket, ids: list[int], options: pb.SamplingOptions,
                        default_max_tokens: int | None, *, images: Sequence[bytes] = ()) -> Prepared:
        """The request as the backend takes it, its max_tokens defaulted to fit the context or refused, and its
        tokens reserved by the tenant's guard."""
        backend = ticket.backend
        limit = backend.card().max_model_len
        given = options.HasField("max_tokens") or default_max_tokens is not None
        options = pb.SamplingOptions(**{f.name: v for f, v in options.ListFields()})
        if options.HasField("max_tokens"):  # at least 1: check_sampling has seen to it
            if len(ids) + options.max_tokens > limit:
                raise context_length_exceeded(limit, len(ids), options.max_tokens)
        else:
            if len(ids) >= limit:
                raise context_length_exceeded(limit, len(ids), 1)
            room = limit - len(ids)
            options.max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        if self.guard is not None:
            await self.guard.reserve(ticket.admission, len(ids), options.max_tokens, max_tokens_given=given)
        tenant = self.guard.context(ticket.identity) if self.guard is not None else None
        adapter = ticket.adapter
        request = pb.GenerateRequest(
            model=backend.name, token_ids=pb.TokenIds(ids=ids), sampling=options, request_id=ticket.request_id,
            tenant=tenant or pb.TenantContext(tenant_id="default", weight=1.0), images=images,
            adapter=pb.LoraAdapter(name=adapter.engine_name, path=adapter.path) if adapter is not None else None,
        )
        return Prepared(backend=backend, request=request, prompt_tokens=len(ids), identity=ticket.identity,
                        admission=ticket.admission)


def _is_parts(content: object) -> bool:
    return isinstance(content, Sequence) and not isinstance(content, str | bytes)


def _parts(messages: Sequence[Mapping[str, Any]], *types: str) -> list[Mapping[str, Any]]:
    """The content parts of `messages` whose type is one of `types`, in prompt order."""
    return [part for m in messages if isinstance(m, Mapping) and _is_parts(m.get("content"))
            for part in m["content"] if isinstance(part, Mapping) and part.get("type") in types]


def _interrupted() -> HerdError:
    return HerdError(Code.UNAVAILABLE, "the server is shutting down; the request was interrupted", reason="interrupted")


__all__ = ["Gateway", "Prepared"]
