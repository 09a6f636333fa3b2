"""The asyncio face of the engine: stream a request's tokens as they come, abort it at any time.

Steps run in a worker thread so the event loop stays free, and each step's text side (detokenising,
stop strings, outputs) runs on an output thread while the next step computes (herd.engine.step_pipeline);
the outputs reach the streams from there. Requests are checked on the caller's thread (so a bad one
raises at once) and handed to the engine thread through a queue, as are aborts and the calls that must see
the engine between two steps (run_between_steps: a prefix's KV exported or imported, a LoRA adapter added or
removed).
A stream whose consumer stops reading (client gone, task cancelled) aborts its request, so its KV
blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar, Unpack

from herd.engine.config import EngineConfig
from herd.engine.errors import Code, HerdError
from herd.engine.llm_engine import EngineRequest, LLMEngine, RequestOptions
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import SamplingParams
from herd.engine.step_pipeline import StepPipeline
from herd.engine.trunk_group import TrunkGroup
from herd.model.lora import load_adapter
from herd.model.prompt import Prompt

T = TypeVar("T")
log = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Wraps an LLMEngine (or the M trunks' engines of a replica, herd.engine.trunk_group, driven as one); one
    background task drives its steps while there is work."""

    def __init__(self, engine: LLMEngine | TrunkGroup, *,
                 step_scope: Callable[[], AbstractContextManager[object]] | None = None) -> None:
        self.engine = engine
        self.step_scope = step_scope or contextlib.nullcontext
        """Entered around every engine step on the worker thread (the replica's sampled step spans)."""
        self._lock = threading.Lock()  # guards the hand-over lists, never held across a step
        self._to_submit: list[EngineRequest] = []
        self._to_abort: list[str] = []
        self._abort_all = False
        self._calls: list[tuple[Callable[[LLMEngine], Any], Future[Any]]] = []
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._pipeline = StepPipeline(engine, self._deliver)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None) -> AsyncLLMEngine:
        return cls(LLMEngine.from_pretrained(path, config))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       **options: Unpack[RequestOptions]) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's output after every step that changes it; the last one has finished=True. A request
        of n choices yields each choice's outputs (by their index, interleaved) and ends when all n have finished.
        A request with images or a structured constraint not compiled before is prepared on a worker thread (the
        vision tower and the grammar compiler run there, not on the loop)."""
        prepare = functools.partial(self.engine.prepare, prompt, params, **options)
        structured = params.structured if params is not None else None
        off_loop = options.get("images") or (structured is not None and not self.engine.grammars.cached(structured))
        request = await asyncio.to_thread(prepare) if off_loop else prepare()
        rid = request.seq.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = queue
        with self._lock:
            self._to_submit.append(request)
        self._ensure_loop()
        unfinished = request.seq.params.n
        try:
            while unfinished:
                for out in _coalesce(await queue.get(), queue):
                    unfinished -= out.finished
                    yield out
        finally:
            if unfinished:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its stream ends with finish_reason "abort"."""
        with self._lock:
            self._to_abort.append(request_id)
        self._ensure_loop()

    def abort_all(self) -> None:
        """Abort every request, submitted or still being handed over; each stream ends with "abort"."""
        with self._lock:
            self._abort_all = True  # after this step's submissions: those are aborted too
        self._ensure_loop()

    async def run_between_steps(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the engine's thread between two steps (before the next step's submissions), for what reads
        or changes the engine's state outside a request; its result, or what it raised."""
        done: Future[T] = Future()
        with self._lock:
            self._calls.append((fn, done))
        self._ensure_loop()
        return await asyncio.wrap_future(done)

    async def add_adapter(self, name: str, path: str | Path) -> None:
        """LLMEngine.add_adapter: the adapter read and checked on a worker thread, then registered between steps
        (so a large adapter's read never holds a step)."""
        adapter = await asyncio.to_thread(load_adapter, path, self.engine.model.config)
        await self.run_between_steps(lambda engine: engine.add_adapter(name, adapter))

    async def remove_adapter(self, name: str) -> None:
        """LLMEngine.remove_adapter, between steps."""
        await self.run_between_steps(lambda engine: engine.remove_adapter(name))

    def _ensure_loop(self) -> None:
        """Start the step loop on the running event loop unless it runs there already. A task of an event loop
        that has closed (asyncio.run ended) never resumes, done or not: its loop's executor threads were joined,
        so no step of it is running, and a new task takes over."""
        loop = asyncio.get_running_loop()
        task = self._loop_task
        if task is None or task.done() or task.get_loop() is not loop:
            self._loop = loop
            self._loop_task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._step)
            except Exception as err:  # a bug: every request in the engine ends with an error, and the loop goes on
                log.exception("engine step failed; failing the requests in the engine")
                await asyncio.to_thread(self._fail_unfinished, err)
            if self._idle():
                await asyncio.to_thread(self._pipeline.drain)  # the last step's outputs reach their streams
                if self._idle():  # checked again after the wait: a request may have come meanwhile, and
                    return  # nothing can come between this check and the task's end (no await)

    def _fail_unfinished(self, err: Exception) -> None:
        """On the worker thread: end every request with an INTERNAL error naming what the step raised."""
        with contextlib.suppress(Exception):  # the step before may have failed too: its outputs are lost
            self._pipeline.drain()
        failure = HerdError(Code.INTERNAL, f"the engine step failed ({type(err).__name__}: {err})")
        self._deliver(self.engine.fail_unfinished(failure))

    def _idle(self) -> bool:
        with self._lock:
            return (not self._to_submit and not self._to_abort and not self._abort_all and not self._calls
                    and not self.engine.has_unfinished())

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """On the output thread: hand a step's outputs to the event loop. Never raises: an error here would stop
        the engine's loop at its next step."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody reads its streams any more
            loop.call_soon_threadsafe(self._put, outputs)

    def _put(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _step(self) -> None:
        """On the worker thread: take the queued submissions and aborts, then one engine step."""
        with self._lock:
            submit, self._to_submit = self._to_submit, []
            abort, self._to_abort = self._to_abort, []
            abort_all, self._abort_all = self._abort_all, False
            calls, self._calls = self._calls, []
        for fn, done in calls:
            if done.set_running_or_notify_cancel():
                try:
                    if not isinstance(self.engine, LLMEngine):
                        raise TypeError("a call between steps takes one engine, not a group of trunks")
                    done.set_result(fn(self.engine))
                except Exception as err:  # the caller's to handle; the engine goes on
                    done.set_exception(err)
        for request in submit:
            self.engine.submit(request)
        for rid in abort:
            self.engine.abort(rid)
        if abort_all:
            self.engine.abort_all()
        if not self.engine.has_unfinished():
            self._pipeline.drain()
            return
        with self.step_scope():
            self._pipeline.step()


def _coalesce(first: RequestOutput, queue: asyncio.Queue[RequestOutput]) -> list[RequestOutput]:
    """Merge every output already waiting into one per choice: a consumer that fell behind (a slow network, a
    busy proxy) gets one message with all the new tokens instead of one message per step. Choices keep the order
    of their first waiting output; a choice's finished output is its last."""
    merged = {first.index: first}
    while not queue.empty():
        later = queue.get_nowait()
        out = merged.get(later.index)
        merged[later.index] = later if out is None else dataclasses.replace(
            later,
            delta_token_ids=out.delta_token_ids + later.delta_token_ids,
            delta_text=out.delta_text + later.delta_text,
        )
    return list(merged.values())
