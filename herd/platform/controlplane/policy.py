"""The autoscaling policy: a pure function `(metrics, state, now) -> (decisions, state)`.

Per scaled unit (a colocated model, or one pool of a disaggregated model; "model" below):
1. Need: the requests in the system (running + queued) over the requests one replica should carry, or
   (when the model sets a token target) their tokens over the tokens one replica should hold, whichever
   is more; at least one while the gateway is refusing requests for want of a replica (scaled to zero).
2. Overrides, each adding one replica beyond the current target while its signal is over its limit and
   nothing is already starting (starting replicas count as coming, not missing, so a cold start of several
   minutes does not make the policy pile up replicas): p95 time to first token over the TTFT SLO; p95
   inter-token latency over the ITL SLO; KV use (blocks used of the pool, now) over its high-water
   fraction. For one window after a replica became ready a latency p95 still holds the waits of the cold
   start that just ended: no latency override then. A disaggregated model's prefill pool sets only the
   TTFT limit, its decode pool only the ITL and KV ones (herd.platform.controlplane.units).
3. Scale to zero after an idle period where the model allows it (min_replicas 0), else at least one;
   the idle period is the stabilisation of that step (the scale-down window does not add to it).
4. Clamp to [min, max], and stabilise like Kubernetes' HPA: going up takes the lowest recommendation
   of a short window (fast), going down the highest of a long window (slow), so noisy metrics do not
   make it flap.
Then, across models, the GPU pool: when the sum of targets does not fit, models are served in
priority order (each first up to its minimum, then up to its target) and the rest wait.
Every decision carries its reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class ModelMetrics:
    """What the control plane reads for one model."""

    running: int = 0  # requests being computed
    queued: int = 0  # requests waiting for a slot (or for a replica of a model at zero)
    in_flight_tokens: int = 0  # prompt + max_tokens of the requests in the system
    refused_cold: int = 0  # requests refused in the last minute because no replica was ready
    awaiting_first_token: int = 0  # of running + queued: those with no output token yet
    ttft_p95_s: float | None = None  # over the last minute; None when there were no requests
    itl_p95_s: float | None = None  # seconds between output tokens, over the last minute; None: no samples
    kv_use: float | None = None  # KV blocks in use of the pool's, 0..1, now; None: not read
    output_tokens_per_s: float = 0.0  # read and shown; not a lever of this policy
    ready: int = 0  # replicas serving
    starting: int = 0  # replicas coming up (loading weights)

    @property
    def demand(self) -> int:
        return self.running + self.queued


@dataclass(frozen=True, kw_only=True)
class ModelPolicy:
    """How one model scales."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_requests_per_replica: float = 32.0
    target_tokens_per_replica: float | None = None  # None: requests alone decide
    ttft_slo_s: float | None = 2.0
    ttft_window_s: float = 60.0  # what the p95 is measured over (the gateway's window)
    itl_slo_s: float | None = None  # p95 inter-token latency above this adds a replica; None: off
    itl_window_s: float = 60.0  # what that p95 is measured over (the gateway's window)
    kv_use_high_water: float | None = None  # KV use above this fraction adds a replica; None: off
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    idle_to_zero_s: float = 900.0  # only when min_replicas is 0
    gpus_per_replica: float = 1.0
    priority: int = 0  # higher is served first when the GPU pool is short

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas >= 1, got {self.min_replicas}, {self.max_replicas}"
            )
        if self.target_requests_per_replica <= 0:
            raise ValueError(f"target_requests_per_replica must be positive, got {self.target_requests_per_replica}")
        if self.target_tokens_per_replica is not None and self.target_tokens_per_replica <= 0:
            raise ValueError(f"target_tokens_per_replica must be positive, got {self.target_tokens_per_replica}")
        if self.kv_use_high_water is not None and not 0 < self.kv_use_high_water <= 1:
            raise ValueError(f"kv_use_high_water must be in (0, 1], got {self.kv_use_high_water}")


@dataclass(frozen=True)
class ModelState:
    """What the policy remembers about one model between calls."""

    target: int
    last_busy: float
    history: tuple[tuple[float, int], ...] = ()  # (time, recommendation), newest last
    ready: int | None = None  # replicas serving at the last call (None: not seen yet)
    ready_rose_at: float | None = None  # when that count last went up


@dataclass(frozen=True)
class Decision:
    target: int
    previous: int
    reason: str

    @property
    def changed(self) -> bool:
        return self.target != self.previous


@dataclass(frozen=True)
class Fleet:
    """Cluster-wide limits."""

    gpu_pool: float | None = None  # GPUs the models may use together; None: unlimited
    policies: Mapping[str, ModelPolicy] = field(default_factory=dict)


def decide(
    metrics: Mapping[str, ModelMetrics], state: Mapping[str, ModelState], now: float, fleet: Fleet
) -> tuple[dict[str, Decision], dict[str, ModelState]]:
    """Targets for every model of the fleet, with reasons, and the state to pass next time."""
    wanted: dict[str, tuple[int, str]] = {}
    new_state: dict[str, ModelState] = {}
    for name, policy in fleet.policies.items():
        m = metrics.get(name, ModelMetrics())
        previous = state.get(name, ModelState(target=policy.min_replicas, last_busy=now))
        target, reason, remembered = _one_model(m, policy, previous, now)
        wanted[name] = (target, reason)
        new_state[name] = remembered
    granted = _fit_pool(wanted, fleet)
    decisions = {}
    for name, (target, reason) in wanted.items():
        got = granted[name]
        if got < target:
            reason += f"; GPU pool full: {got} of {target} granted (priority {fleet.policies[name].priority})"
        was = state.get(name, ModelState(target=fleet.policies[name].min_replicas, last_busy=now)).target
        decisions[name] = Decision(target=got, previous=was, reason=reason)
        new_state[name] = replace(new_state[name], target=got)
    return decisions, new_state


def _one_model(m: ModelMetrics, p: ModelPolicy, s: ModelState, now: float) -> tuple[int, str, ModelState]:
    last_busy = now if m.demand > 0 or m.refused_cold else s.last_busy
    need = math.ceil(m.demand / p.target_requests_per_replica)
    reason = f"{m.demand} requests / {p.target_requests_per_replica:g} per replica -> {need}"
    if p.target_tokens_per_replica is not None:
        by_tokens = math.ceil(m.in_flight_tokens / p.target_tokens_per_replica)
        if by_tokens > need:
            need = by_tokens
            reason += f"; {m.in_flight_tokens} tokens / {p.target_tokens_per_replica:g} per replica -> {need}"
    if m.refused_cold and need == 0:
        need = 1
        reason += f"; {m.refused_cold} request(s) refused for want of a replica -> 1"
    ready_rose_at = now if s.ready is not None and m.ready > s.ready else s.ready_rose_at
    for signal, over, latency in _breaches(m, p):
        if m.starting:
            reason += f"; {signal}, {m.starting} replica(s) already starting"
        elif latency is not None and ready_rose_at is not None and now - ready_rose_at < latency:
            reason += f"; {signal}, but a replica became ready {now - ready_rose_at:.0f}s ago (cold-start waits)"
        elif s.target + 1 > need:
            need = s.target + 1
            reason += f"; {over} -> {need}"
    idle_for = now - last_busy
    to_zero = False
    if need == 0:
        if p.min_replicas == 0 and idle_for >= p.idle_to_zero_s:
            to_zero = True
            reason += f"; idle {idle_for:.0f}s >= {p.idle_to_zero_s:g}s -> scale to zero"
        else:
            need = max(1, p.min_replicas) if (p.min_replicas > 0 or s.target > 0) else 0
    clamped = min(max(need, p.min_replicas), p.max_replicas)
    if clamped != need:
        reason += f"; clamped to [{p.min_replicas}, {p.max_replicas}] -> {clamped}"
    history = tuple((t, r) for t, r in s.history if now - t <= max(p.scale_up_window_s, p.scale_down_window_s))
    history += ((now, clamped),)
    target = 0 if to_zero else _stabilised(history, s.target, now, p)
    if target != clamped:
        direction = "down" if target > clamped else "up"
        window = p.scale_down_window_s if direction == "down" else p.scale_up_window_s
        reason += f"; held at {target} by the {window:g}s scale-{direction} window"
    return target, reason, ModelState(target=target, last_busy=last_busy, history=history, ready=m.ready,
                                      ready_rose_at=ready_rose_at)


def _breaches(m: ModelMetrics, p: ModelPolicy) -> list[tuple[str, str, float | None]]:
    """The overrides whose signal is over its limit while there is demand: (which, by how much, the window a
    latency p95 is measured over; None for KV use, read now)."""
    if m.demand == 0:
        return []
    out: list[tuple[str, str, float | None]] = []
    if p.ttft_slo_s is not None and m.ttft_p95_s is not None and m.ttft_p95_s > p.ttft_slo_s:
        out.append(("TTFT over SLO", f"TTFT p95 {m.ttft_p95_s:.2f}s over the {p.ttft_slo_s:g}s SLO", p.ttft_window_s))
    if p.itl_slo_s is not None and m.itl_p95_s is not None and m.itl_p95_s > p.itl_slo_s:
        itl = f"ITL p95 {m.itl_p95_s * 1e3:.0f}ms over the {p.itl_slo_s * 1e3:g}ms SLO"
        out.append(("ITL over SLO", itl, p.itl_window_s))
    if p.kv_use_high_water is not None and m.kv_use is not None and m.kv_use > p.kv_use_high_water:
        kv = f"KV use {m.kv_use:.0%} over the {p.kv_use_high_water:.0%} high-water"
        out.append(("KV use over high-water", kv, None))
    return out


def _stabilised(history: tuple[tuple[float, int], ...], current: int, now: float, p: ModelPolicy) -> int:
    """Up: the least of the recent recommendations (window may be 0: at once). Down: the most of the
    long window, never below what it recommends now."""
    latest = history[-1][1]
    if latest > current:
        recent = [r for t, r in history if now - t <= p.scale_up_window_s]
        return max(current, min(recent))
    if latest < current:
        window = [r for t, r in history if now - t <= p.scale_down_window_s]
        return min(current, max(window))
    return current


def _fit_pool(wanted: Mapping[str, tuple[int, str]], fleet: Fleet) -> dict[str, int]:
    """Targets that fit the GPU pool: by priority, minimums first, then the rest of each target."""
    if fleet.gpu_pool is None:
        return {name: target for name, (target, _) in wanted.items()}
    order = sorted(wanted, key=lambda n: (-fleet.policies[n].priority, n))
    left = fleet.gpu_pool
    granted = {name: 0 for name in wanted}
    for stage in ("minimum", "target"):
        for name in order:
            policy = fleet.policies[name]
            goal = min(policy.min_replicas, wanted[name][0]) if stage == "minimum" else wanted[name][0]
            extra = max(0, goal - granted[name])
            fits = int(left // policy.gpus_per_replica) if policy.gpus_per_replica > 0 else extra
            add = min(extra, fits)
            granted[name] += add
            left -= add * policy.gpus_per_replica
    return granted
