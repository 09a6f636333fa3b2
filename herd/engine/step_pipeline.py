"""Overlap: the engine core computes step N+1 while step N's outputs are processed on an output thread.

The caller's thread runs the core (schedule, model, sampling, the finishes that decide the next batch);
one output thread detokenises, looks for stop strings and builds the RequestOutputs, and hands them to
`deliver` as soon as they are ready, without waiting for the next core step. Torch ops release the GIL,
so on a CPU the text work runs beside the model's ops; on a GPU beside its kernels.

At most one step is in flight on the output thread: each `step` waits for the previous step's processing
before handing over its own, so outputs never fall more than one step behind and the stop strings found
there are applied (their requests freed) before the next core step but one. A stop string therefore
costs at most one extra step of compute and never a wrong output (the output processor drops what the
core made after it).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from herd.engine.output_processor import CoreOutput
from herd.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from herd.engine.llm_engine import LLMEngine  # which runs its own batches through a pipeline
    from herd.engine.trunk_group import TrunkGroup


class StepPipeline:
    """Drives an LLMEngine's core steps on the calling thread and its output processing on its own thread."""

    def __init__(self, engine: LLMEngine | TrunkGroup, deliver: Callable[[list[RequestOutput]], None]) -> None:
        self.engine = engine
        self.deliver = deliver
        """Called on the output thread with each step's outputs, in step order."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-outputs")
        self._in_flight: Future[list[str]] | None = None

    def step(self) -> None:
        """One core step, overlapping the processing of the step before it, whose outputs are then delivered
        and whose stop strings are applied before this step's outputs go to the output thread."""
        core = self.engine.core_step()
        self.drain()
        self._in_flight = self._thread.submit(self._process, core)

    def drain(self) -> None:
        """Wait for the step in flight on the output thread (its outputs delivered), and free the requests
        whose stop strings it found. Re-raises what processing raised."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self.engine.finish_stopped(in_flight.result())

    def close(self) -> None:
        self.drain()
        self._thread.shutdown(wait=True)

    def _process(self, core: list[CoreOutput]) -> list[str]:
        processed = self.engine.outputs.process(core)
        if processed.outputs:
            self.deliver(processed.outputs)
        return processed.stopped
