"""A replica's expert shards restarted in place (issue 27): a dead shard actor comes back, the rest stay.

Each shard actor is created with Ray restarts on (ReplicaConfig.shard_restarts): when its process dies Ray starts
it again in the same placement-group bundle, and its constructor loads its experts again. `ShardRecovery` notices
the death at once (every actor has a `watch` call pending that only ever ends by the actor dying) and runs the
replica's `restore(index)` for that shard on its own thread: wait for the new process, reconnect the transport
(a new gRPC address, or a new collective group of every rank), load the resident LoRA adapters again. Meanwhile
the dispatcher is paused (its steps fail with a retryable UNAVAILABLE, so the engine holds their requests:
herd.engine.fault_hold) and the replica reports healthy, recovering, so that Serve does not restart it whole and
the control plane does not count it gone. The trunk, its KV cache and the other shards are untouched.

More than `shard_restarts` restarts within RESTART_WINDOW_S, a restart not back within RESTART_TIMEOUT_S or a
restore that fails is a failed recovery: the replica reports unhealthy from then on and Serve replaces it (the
gateway continues its requests elsewhere: herd.platform.gateway.continuation).

`RestartBudget` is the pure decision; `ShardRecovery` the thread around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

log = logging.getLogger(__name__)

RESTART_WINDOW_S = 600.0
"""The window over which a replica counts its shards' restarts against ReplicaConfig.shard_restarts."""
RESTART_TIMEOUT_S = 120.0
"""How long a restore waits for Ray to bring a dead shard back (a process start and its experts' weights)."""
NOTICE_S = 2.0
"""How long a replica's health check waits for a shard it finds gone to be noticed dead (and restored in place)
before it reports unhealthy (a shard that is hung, not dead, is never restored: the replica is restarted)."""
WATCH_POLL_S = 1.0
"""How often the watching thread looks whether it was told to stop (it wakes at once for a death)."""


class RestartBudget:
    """At most `limit` restarts within `window_s`: a shard dying more often than that is crash-looping, and the
    replica is better restarted whole. Pure, with an injectable clock."""

    def __init__(self, limit: int, *, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._restarts: deque[float] = deque()

    def allow(self) -> bool:
        """Whether one more restart may happen now (and if so it is counted)."""
        now = self.clock()
        while self._restarts and now - self._restarts[0] >= self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.limit:
            return False
        self._restarts.append(now)
        return True


class ShardRecovery:
    """Watches a replica's shard actors from a thread of its own and restores each one that dies.

    `restore(index)` does the transport's part (it may block for the restart); `pause(lost)`/`resume` stop and
    restart the dispatcher's steps around it (lost: for good, the recovery gave up); `observe(seconds)` is told
    each recovery's duration (metrics).
    """

    def __init__(self, actors: list[Any], restore: Callable[[int], None], *, budget: RestartBudget,
                 pause: Callable[[bool], None], resume: Callable[[], None],
                 observe: Callable[[float], None] = lambda _: None) -> None:
        self.actors, self.budget = actors, budget
        self._restore, self._pause, self._resume, self._observe = restore, pause, resume, observe
        self.restarts = 0
        """Shards restored since the replica started."""
        self.last_recovery_s = 0.0
        """From the death being noticed to the shard serving again, for the last one restored."""
        self.failed: str | None = None
        """Why recovery gave up (the replica is then unhealthy for good); None while it has not."""
        self._recovering = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shard-recovery", daemon=True)
        self._thread.start()

    @property
    def recovering(self) -> bool:
        """True while a dead shard is being restored (the replica holds its steps meanwhile)."""
        return self._recovering.is_set()

    def noticed(self, within_s: float = NOTICE_S) -> bool:
        """Whether a shard is being restored, waiting up to `within_s` for a death to be noticed (a health check
        can find a shard gone a moment before Ray tells the watch)."""
        return self._recovering.wait(within_s)

    def close(self) -> None:
        """Stop watching (before the replica kills its shards itself)."""
        self._closed.set()
        self._thread.join(timeout=WATCH_POLL_S * 2)

    def _watch(self) -> None:
        watches = {self.actors[i].watch.remote(): i for i in range(len(self.actors))}
        while not self._closed.is_set() and self.failed is None:
            done, _ = ray.wait(list(watches), num_returns=1, timeout=WATCH_POLL_S)
            if not done or self._closed.is_set():
                continue
            index = watches.pop(done[0])
            self._recover(index)
            if self.failed is None:
                watches[self.actors[index].watch.remote()] = index

    def _recover(self, index: int) -> None:
        """Shard `index` died: restore it, or give up (the replica reports unhealthy from then on)."""
        if not self.budget.allow():
            self._give_up(f"expert shard {index} died again: more than {self.budget.limit} shard restarts within "
                          f"{self.budget.window_s:g} s")
            return
        log.warning("expert shard %d of this replica died; restarting it in place (requests are held meanwhile)",
                    index)
        start = time.monotonic()
        self._recovering.set()
        self._pause(False)
        try:
            self._restore(index)
        except Exception as err:
            self._give_up(f"expert shard {index} could not be restored: {err}")
            return
        finally:
            self._recovering.clear()
        self._resume()
        self.restarts += 1
        self.last_recovery_s = time.monotonic() - start
        self._observe(self.last_recovery_s)
        log.warning("expert shard %d of this replica is back after %.2f s", index, self.last_recovery_s)

    def _give_up(self, why: str) -> None:
        log.error("%s; the replica reports unhealthy and is restarted whole", why)
        self.failed = why
        self._pause(True)  # its requests end now (and move to another replica) instead of waiting out the hold


__all__ = ["RESTART_TIMEOUT_S", "RESTART_WINDOW_S", "RestartBudget", "ShardRecovery"]
