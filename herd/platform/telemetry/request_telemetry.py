"""One request as telemetry sees it: its span, its metrics and its access-log line, from one place.

The gateway starts a `RequestRecord` when a request reaches `Gateway.stream` and tells it what happens
(admitted, tokens, the end); the record keeps the span open across the stream and writes the numbers
once, at the end. The span's context goes into the internal GenerateRequest, so the replica's spans
(queue, prefill, decode) are its children in the same trace.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from herd.platform.gateway.errors import http_status
from herd.platform.telemetry import logs
from herd.platform.telemetry.gateway_metrics import GatewayMetrics
from herd.platform.telemetry.tracing import inject

if TYPE_CHECKING:
    from herd.engine.errors import HerdError
    from herd.protos.herd.v1 import inference_pb2 as pb

tracer = trace.get_tracer("herd.gateway")
access = logging.getLogger("herd.access")


class RequestTelemetry:
    """The gateway's telemetry: metrics registry, tracer, and whether prompt text may be recorded."""

    def __init__(self, metrics: GatewayMetrics | None = None, *, log_prompts: bool = False) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.log_prompts = log_prompts

    def start(self, request: pb.GenerateRequest, *, prompt_tokens: int, tenant: str, parent: Context | None,
              prompt_text: str | None = None) -> RequestRecord:
        """`request` is the internal GenerateRequest; its trace_context is filled with the new span's."""
        span = tracer.start_span(f"herd.request {request.model}", context=parent, kind=SpanKind.SERVER, attributes={
            "gen_ai.request.model": request.model, "herd.request_id": request.request_id, "herd.tenant": tenant,
            "gen_ai.usage.input_tokens": prompt_tokens, "gen_ai.request.max_tokens": request.sampling.max_tokens,
        })
        if self.log_prompts and prompt_text is not None:
            span.set_attribute("herd.prompt", prompt_text)
        request.trace_context.update(inject(trace.set_span_in_context(span)))
        return RequestRecord(self, span, request.model, tenant, request.request_id, prompt_tokens)

    def refused(self, model: str, tenant: str, request_id: str, error: HerdError) -> None:
        """A request refused by its tenant's limits (or failed) before it was sent: counted like one that ended
        so (requests by status, 429s by limit) and one access-log line; it has no span (nothing ran for it)."""
        status = error.code.value.lower()
        self.metrics.requests.labels(model, tenant, status).inc()
        if http_status(error) == 429:
            self.metrics.rate_limited.labels(model, tenant, error.reason or "capacity").inc()
        access.info("request %s", status, extra={"request_id": request_id, "model": model, "tenant": tenant,
                                                 "status": status, "prompt_tokens": 0, "completion_tokens": 0})


class RequestRecord:
    def __init__(self, owner: RequestTelemetry, span: Span, model: str, tenant: str, request_id: str,
                 prompt_tokens: int) -> None:
        self.owner, self.span, self.model, self.tenant = owner, span, model, tenant
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.started = time.monotonic()
        self._token = logs.request_id.set(request_id)
        context = span.get_span_context()
        if context.is_valid:
            logs.trace_ids[request_id] = (format(context.trace_id, "032x"), format(context.span_id, "016x"))
        self._queue = tracer.start_span("herd.gateway.admit", context=trace.set_span_in_context(span))
        self.first_token_s: float | None = None
        self._last_token_at: float | None = None
        self.admitted_at: float | None = None

    def admitted(self) -> None:
        """Past tenant admission and the wait for a replica: the request goes to the model now."""
        self.admitted_at = time.monotonic()
        self._queue.end()

    def tokens(self, count: int) -> None:
        """`count` new output tokens arrived (one chunk; several tokens when the replica batched them)."""
        if not count:
            return
        now = time.monotonic()
        metrics = self.owner.metrics
        if self._last_token_at is None:
            self.first_token_s = now - (self.admitted_at or self.started)
            metrics.ttft.labels(self.model).observe(self.first_token_s)
            self.span.add_event("first_token")
            count -= 1
        elif count:
            gap = (now - self._last_token_at) / count  # a chunk of n tokens: n gaps of the mean length
            for _ in range(count):
                metrics.itl.labels(self.model).observe(gap)
        self._last_token_at = now

    def end(self, status: str, *, completion_tokens: int, cached_tokens: int,
            error: HerdError | None = None) -> None:
        """The request is over (any way): count it, close its spans, write its access-log line."""
        metrics = self.owner.metrics
        if self.admitted_at is None:
            self._queue.end()
        seconds = time.monotonic() - self.started
        metrics.requests.labels(self.model, self.tenant, status).inc()
        if error is not None and http_status(error) == 429:
            metrics.rate_limited.labels(self.model, self.tenant, error.reason or "capacity").inc()
        if self.admitted_at is not None:
            metrics.e2e.labels(self.model, status).observe(time.monotonic() - self.admitted_at)
            metrics.prompt_tokens.labels(self.model, self.tenant).inc(self.prompt_tokens)
            metrics.cached_tokens.labels(self.model, self.tenant).inc(cached_tokens)
            metrics.generation_tokens.labels(self.model, self.tenant).inc(completion_tokens)
        self.span.set_attributes({"gen_ai.usage.output_tokens": completion_tokens, "herd.cached_tokens": cached_tokens,
                                  "herd.status": status})
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{error.code.value}: {error.message}"))
        self.span.end()
        with trace.use_span(self.span, end_on_exit=False):  # the line carries the request's trace id
            access.info("request %s", status, extra={
                "request_id": self.request_id, "model": self.model, "tenant": self.tenant, "status": status,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion_tokens, "cached_tokens": cached_tokens,
                "ttft_s": round(self.first_token_s, 4) if self.first_token_s is not None else None,
                "duration_s": round(seconds, 4),
            })
        logs.trace_ids.pop(self.request_id, None)
        try:
            logs.request_id.reset(self._token)
        except ValueError:  # ended in another context than it started (a stream closed by another task)
            logs.request_id.set("")


__all__ = ["RequestRecord", "RequestTelemetry"]
