"""Holding a step's requests while the experts are unreachable, instead of failing them (issue 27).

A step whose forward raises a retryable HerdError (UNAVAILABLE or DEADLINE_EXCEEDED: an expert shard died
or is late) has produced nothing the engine keeps. The engine then does not tell the scheduler the step ran:
its sequences stay at their last completed token (num_computed, output, prefix-cache commits untouched, the
blocks it allocated kept) and the next schedule gives them the same positions again, whose KV entries the
failed forward may have half written and the retry writes whole. Nothing was sampled, so the retried step
samples what the undisturbed one would have (seeded draws are keyed by request and position). With async
scheduling the failed step was already counted done and its successor scheduled on it: its sequences are
preempted by recompute instead (computed again from their tokens: the same positions, nothing sampled).

FaultHold decides, from when the current run of failures began, whether a failed step is retried or its
requests end, and counts failures, holds and recoveries. Pure bookkeeping with an injectable clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from herd.engine.errors import Code, HerdError

RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})
"""The step errors that a shard coming back may cure."""
EXPERTS_LOST = "experts_lost"
"""The reason of a step error that no wait can cure (an executor that knows it is broken for good, as the
collective transport's group after a failure): never held, its requests end at once."""
RETRY_AFTER_S = 5
"""What a request ended past the hold tells its client: a shard restart takes seconds."""
GAVE_UP = "an expert shard of this replica is unavailable; retry the request"
"""The message past the hold: generic (the transport's error names internal addresses)."""


class FaultHold:
    """The engine's hold on failing steps: begun by the first retryable failure since a step last succeeded, ended
    by the next successful step (a recovery) or by the engine running out of work."""

    def __init__(self, hold_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        """How long the held requests wait for the experts (EngineConfig.fault_hold_s); 0: no hold."""
        self.clock = clock
        self.since: float | None = None
        """When the current hold began (the clock's time of its first failed step); None: not holding."""
        self.failed_steps = 0
        """Since the engine started: steps whose forward raised a HerdError, holds begun, holds that ended with a
        successful step, and how long the last of those lasted (s)."""
        self.holds = 0
        self.recoveries = 0
        self.last_recovery_s = 0.0

    @property
    def holding(self) -> bool:
        return self.since is not None

    def on_failure(self, err: HerdError) -> HerdError | None:
        """A step failed with err: None to hold its requests (the step is retried), or the error to end them with
        (err itself when it is not retryable or the hold is off; a generic UNAVAILABLE once the hold has lasted
        hold_s)."""
        self.failed_steps += 1
        if self.hold_s == 0 or err.code not in RETRYABLE or err.reason == EXPERTS_LOST:
            return err
        now = self.clock()
        if self.since is None:
            self.since = now
            self.holds += 1
        if now - self.since < self.hold_s:
            return None
        return HerdError(Code.UNAVAILABLE, GAVE_UP, reason="experts_unavailable", retry_after_s=RETRY_AFTER_S)

    def on_success(self) -> None:
        """A step's forward succeeded: a hold in progress ends as a recovery."""
        if self.since is not None:
            self.recoveries += 1
            self.last_recovery_s = self.clock() - self.since
            self.since = None

    def on_idle(self) -> None:
        """The engine has nothing left to run (every held request ended or was aborted): a hold ends unrecovered,
        so that the next failure, maybe much later, begins a hold of its own."""
        self.since = None
