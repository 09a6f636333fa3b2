"""A day of synthetic traffic for Scout and Maverick, served by Herd's autoscaling policy and by fixed fleets.

The question: what does `herd.platform.controlplane.policy.decide` save in GPU-hours against a fleet sized
for the peak, and what does it cost in time-to-first-token (TTFT) SLO attainment when a cold start takes
minutes? Every fleet sees the same arrivals (same seed).

The model. Every constant below is an ASSUMPTION chosen to look like H100-class serving, not a measurement.
- Traffic, per model: a business-day rate curve (a floor overnight, a sin^2 hump from `day_start_h` to
  `day_end_h`) plus random bursts (extra rate for a few minutes, at any hour), Poisson arrivals. Prompt and
  output lengths are log-normal.
- A replica computes at most `max_running` requests at once, all decoding together: one decode step takes
  `step_base_s + step_per_seq_s * running`, so each running request gets 1 / (step time) tokens/s and the
  replica's total grows, sublinearly, with its batch. A request holds its slot from admission to its last
  output token. TTFT = queue wait + prompt_tokens / prefill_tokens_per_s; prefill does not slow the
  decodes around it (optimistic).
- The router sends a request to the ready replica with the fewest running; when every ready replica is full
  it waits in one FIFO queue per model. Nothing is dropped, and clients are patient: a request for a
  model with no ready replica waits for one (Herd's gateway holds it for its cold-start wait and then
  answers 503 for the client to retry; here the whole wait counts as TTFT).
- A started replica holds its GPUs at once and serves after `cold_start_s` (scheduling, weights, warm-up).
  A removed replica stops admitting and keeps its GPUs until its last request finishes (drain); replicas
  still starting are removed first.
- Time moves in steps of --step-s: arrivals are placed exactly and admitted at once when a slot is free;
  queued requests are admitted at step boundaries (their wait is rounded up to the step); completions are
  counted at the end of the step they fall in.
- "autoscaled" calls `decide` every CONTROL_INTERVAL_S with what Herd's control plane reads: running,
  queued, TTFT p95 over the last minute (the gateway's formula, over first tokens seen), ready, starting.
  It starts the day at each policy's minimum, warm.
- "fixed at peak": warm all day, enough replicas for the day's highest per-second rate (bursts included) at
  the policy's target_requests_per_replica, by Little's law with a request's time at that batch size.
  "fixed at mean": the same at the day's mean rate (under-provisioned by design).

SLO attainment counts every arrival: met when TTFT <= the model's SLO; a request with no first token by the
end counts as missed. TTFT percentiles are over requests that got a first token.

    .venv/bin/python bench/autoscale_sim.py [--seed 0] [--seeds 5] [--hours 24] [--step-s 1] [--gpu-pool N]
                                        [--scale-up-window-s S] [--smoke]
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import parse_args_with_smoke
from herd.platform.controlplane.policy import Fleet, ModelMetrics, ModelPolicy, ModelState, decide

CONTROL_INTERVAL_S = 10.0  # the control loop's default interval
TTFT_WINDOW_S = 60.0  # the gateway's rolling window for TTFT p95
FLAP_WINDOW_S = 600.0  # a scale-down undone by a scale-up within this counts as a reversal
STALE_SLO_S = TTFT_WINDOW_S  # an SLO scale-up this soon after a replica came up acts on pre-ready TTFTs


@dataclass(frozen=True, kw_only=True)
class ReplicaModel:
    """How one replica of a model performs (assumed)."""

    gpus_per_replica: int  # GPUs one replica holds, starting, serving or draining
    cold_start_s: float  # from start to serving: scheduling, weights load, warm-up
    max_running: int  # requests one replica computes at once (the engine's max_num_seqs)
    step_base_s: float  # one decode step with one running request
    step_per_seq_s: float  # what each further running request adds to a decode step
    prefill_tokens_per_s: float  # prompt tokens per second of prefill, for one request
    ttft_slo_s: float  # what SLO attainment is measured against

    def tokens_per_s_each(self, running: int) -> float:
        """Output tokens per second each running request gets."""
        return 1.0 / (self.step_base_s + self.step_per_seq_s * max(1, running))


@dataclass(frozen=True, kw_only=True)
class TrafficModel:
    """One model's synthetic day (assumed)."""

    night_rate_per_s: float  # arrivals per second outside the business day
    peak_rate_per_s: float  # arrivals per second at the top of the business-day hump
    day_start_h: float = 7.0  # hump from here...
    day_end_h: float = 20.0  # ...to here, hours of the day
    bursts_per_day: float = 8.0  # Poisson number of bursts, placed uniformly over the horizon
    burst_s: tuple[float, float] = (120.0, 600.0)  # a burst lasts uniformly this long
    burst_extra: tuple[float, float] = (0.2, 0.6)  # and adds uniformly this share of peak_rate_per_s
    prompt_median_tokens: float
    prompt_sigma: float  # of log(prompt tokens)
    output_median_tokens: float
    output_sigma: float  # of log(output tokens)
    max_tokens: int = 16384  # both lengths are clipped to [1, max_tokens]


MODELS = {
    "scout": ReplicaModel(gpus_per_replica=1, cold_start_s=180.0, max_running=64, step_base_s=0.012,
                          step_per_seq_s=0.0005, prefill_tokens_per_s=8000.0, ttft_slo_s=2.0),
    "maverick": ReplicaModel(gpus_per_replica=8, cold_start_s=480.0, max_running=64, step_base_s=0.020,
                             step_per_seq_s=0.0004, prefill_tokens_per_s=12000.0, ttft_slo_s=4.0),
}
TRAFFIC = {
    "scout": TrafficModel(night_rate_per_s=1.0, peak_rate_per_s=12.0, prompt_median_tokens=800.0,
                          prompt_sigma=1.0, output_median_tokens=300.0, output_sigma=0.7),
    "maverick": TrafficModel(night_rate_per_s=0.001, peak_rate_per_s=3.0, bursts_per_day=4.0,
                             prompt_median_tokens=1500.0, prompt_sigma=1.0, output_median_tokens=400.0,
                             output_sigma=0.7),
}
POLICIES = {
    "scout": ModelPolicy(min_replicas=1, max_replicas=8, target_requests_per_replica=32, ttft_slo_s=2.0,
                         scale_down_window_s=300.0, gpus_per_replica=1, priority=1),
    "maverick": ModelPolicy(min_replicas=0, max_replicas=4, target_requests_per_replica=32, ttft_slo_s=4.0,
                            scale_down_window_s=600.0, idle_to_zero_s=900.0, gpus_per_replica=8, priority=0),
}


@dataclass(frozen=True)
class Arrivals:
    """One model's requests for the whole horizon (N requests, S seconds)."""

    at_s: np.ndarray  # [N] sorted arrival times
    prompt_tokens: np.ndarray  # [N]
    output_tokens: np.ndarray  # [N]
    rate_per_s: np.ndarray  # [S] the rate curve they were drawn from, bursts included


def rate_curve(traffic: TrafficModel, hours: float, rng: np.random.Generator) -> np.ndarray:
    """[S] arrivals per second, one value per second of the horizon."""
    hour_of_day = (np.arange(int(hours * 3600)) / 3600.0) % 24.0
    phase = (hour_of_day - traffic.day_start_h) / (traffic.day_end_h - traffic.day_start_h)
    hump = np.where((phase > 0) & (phase < 1), np.sin(np.pi * np.clip(phase, 0, 1)) ** 2, 0.0)
    rate = traffic.night_rate_per_s + (traffic.peak_rate_per_s - traffic.night_rate_per_s) * hump
    for _ in range(rng.poisson(traffic.bursts_per_day * hours / 24.0)):
        start = int(rng.uniform(0, len(rate)))
        length = int(rng.uniform(*traffic.burst_s))
        rate[start:start + length] += rng.uniform(*traffic.burst_extra) * traffic.peak_rate_per_s
    return rate


def make_arrivals(traffic: TrafficModel, hours: float, rng: np.random.Generator) -> Arrivals:
    rate = rate_curve(traffic, hours, rng)
    counts = rng.poisson(rate)  # [S] arrivals in each second
    at_s = np.sort(np.repeat(np.arange(len(rate)), counts) + rng.random(int(counts.sum())))

    def lengths(median: float, sigma: float) -> np.ndarray:
        drawn = rng.lognormal(math.log(median), sigma, len(at_s))
        return np.clip(np.rint(drawn), 1, traffic.max_tokens).astype(np.int64)

    return Arrivals(at_s, lengths(traffic.prompt_median_tokens, traffic.prompt_sigma),
                    lengths(traffic.output_median_tokens, traffic.output_sigma), rate)


def replicas_for(rate_per_s: float, arrivals: Arrivals, model: ReplicaModel, policy: ModelPolicy) -> int:
    """Replicas an operator would provision for this rate: Little's law at the policy's per-replica target."""
    batch = int(policy.target_requests_per_replica)
    seconds_each = (arrivals.prompt_tokens.mean() / model.prefill_tokens_per_s
                    + arrivals.output_tokens.mean() / model.tokens_per_s_each(batch))
    return max(1, math.ceil(rate_per_s * seconds_each / policy.target_requests_per_replica))


class Replica:
    """One replica. Its running requests decode in lockstep, so one number, the output tokens each has been
    given since the replica started, says who is done: a request admitted at v with n output tokens ends at
    v + n. `finish_at_tokens` is a min-heap of those ends; its length is the number running."""

    __slots__ = ("draining", "finish_at_tokens", "ready_at_s", "tokens_each")

    def __init__(self, ready_at_s: float) -> None:
        self.ready_at_s = ready_at_s
        self.draining = False
        self.tokens_each = 0.0
        self.finish_at_tokens: list[float] = []


def _running(replica: Replica) -> int:
    return len(replica.finish_at_tokens)


class ModelSim:
    """One model's replicas, queue and record."""

    def __init__(self, model: ReplicaModel, arrivals: Arrivals, replicas: int) -> None:
        self.model, self.arrivals = model, arrivals
        self.at_s, self.prompt = arrivals.at_s.tolist(), arrivals.prompt_tokens.tolist()
        self.output = arrivals.output_tokens.tolist()
        self.replicas = [Replica(ready_at_s=0.0) for _ in range(replicas)]
        self.queue: deque[int] = deque()  # request indices, FIFO
        self.ttft_s = [math.nan] * len(self.at_s)  # [N]; nan: no first token yet
        self.recent: deque[tuple[float, float]] = deque()  # (first token at s, TTFT s), the gateway's window
        self.none_ready: list[int] = []  # requests that arrived while no replica was serving
        self.completed = 0
        self.gpu_s = 0.0

    def step(self, t: float, dt: float, first: int, end: int) -> None:
        """Time t to t + dt; arrivals[first:end] fall in it."""
        ready = [r for r in self.replicas if not r.draining and r.ready_at_s <= t]
        while self.queue and ready:
            replica = min(ready, key=_running)
            if _running(replica) >= self.model.max_running:
                break
            self._admit(self.queue.popleft(), replica, t, t)
        for i in range(first, end):
            self._arrive(i, ready, t)
        self._decode(dt)
        self.gpu_s += len(self.replicas) * self.model.gpus_per_replica * dt
        self.replicas = [r for r in self.replicas if r.finish_at_tokens or not r.draining]

    def _arrive(self, i: int, ready: list[Replica], t: float) -> None:
        if not ready:
            self.none_ready.append(i)
        replica = min(ready, key=_running) if ready else None
        if self.queue or replica is None or _running(replica) >= self.model.max_running:
            self.queue.append(i)
        else:
            self._admit(i, replica, self.at_s[i], t)

    def _admit(self, i: int, replica: Replica, now: float, step_start: float) -> None:
        heap = replica.finish_at_tokens
        tokens_now = replica.tokens_each + (now - step_start) * self.model.tokens_per_s_each(len(heap))
        heapq.heappush(heap, tokens_now + self.output[i])
        prefill_s = self.prompt[i] / self.model.prefill_tokens_per_s
        ttft = now - self.at_s[i] + prefill_s
        self.ttft_s[i] = ttft
        self.recent.append((now + prefill_s, ttft))

    def _decode(self, dt: float) -> None:
        for replica in self.replicas:
            heap = replica.finish_at_tokens
            if not heap:
                continue
            replica.tokens_each += dt * self.model.tokens_per_s_each(len(heap))
            while heap and heap[0] <= replica.tokens_each:
                heapq.heappop(heap)
                self.completed += 1

    def metrics(self, now: float) -> ModelMetrics:
        """What the control plane would read now."""
        while self.recent and now - self.recent[0][0] > TTFT_WINDOW_S:
            self.recent.popleft()
        ttfts = sorted(ttft for _, ttft in self.recent)
        p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None
        live = [r for r in self.replicas if not r.draining]
        ready = sum(1 for r in live if r.ready_at_s <= now)
        return ModelMetrics(running=sum(map(_running, self.replicas)), queued=len(self.queue), ttft_p95_s=p95,
                            ready=ready, starting=len(live) - ready)

    def scale_to(self, target: int, now: float) -> None:
        """Start replicas, or drain them: the starting ones first (newest first), then the least busy."""
        live = [r for r in self.replicas if not r.draining]
        if target > len(live):
            self.replicas += [Replica(ready_at_s=now + self.model.cold_start_s) for _ in range(target - len(live))]
            return
        by_removal = sorted(live, key=lambda r: (r.ready_at_s <= now, _running(r), -r.ready_at_s))
        for replica in by_removal[:len(live) - target]:
            replica.draining = True
        self.replicas = [r for r in self.replicas if r.finish_at_tokens or not r.draining]

    def last_ready_s(self, now: float) -> float:
        return max((r.ready_at_s for r in self.replicas if 0 < r.ready_at_s <= now), default=-math.inf)


@dataclass(frozen=True)
class Outcome:
    """One model's day under one fleet."""

    ttft_s: np.ndarray  # [N], nan where no first token came
    none_ready: np.ndarray  # [N] bool: arrived while no replica was serving
    gpu_hours: float
    arrivals: int
    completed: int
    in_flight_end: int  # running + queued at the end
    targets: list[tuple[float, int, str]]  # (time, target, reason) at start and at every change
    stale_slo_ups: int  # SLO scale-ups within STALE_SLO_S of a replica coming up


def simulate(arrivals: Mapping[str, Arrivals], *, hours: float, step_s: float, fleet: Fleet | None = None,
             fixed: Mapping[str, int] | None = None) -> dict[str, Outcome]:
    """The day for every model, autoscaled by `decide` under `fleet`, or at `fixed` replicas."""
    if (fleet is None) == (fixed is None):
        raise ValueError("give either fleet (autoscaled) or fixed replicas")
    start = {m: fleet.policies[m].min_replicas for m in arrivals} if fleet else dict(fixed or {})
    sims = {m: ModelSim(MODELS[m], a, start[m]) for m, a in arrivals.items()}
    steps = round(hours * 3600 / step_s)
    bounds = {m: np.searchsorted(a.at_s, np.arange(steps + 1) * step_s).tolist() for m, a in arrivals.items()}
    every = max(1, round(CONTROL_INTERVAL_S / step_s))
    targets = {m: [(0.0, n, "start")] for m, n in start.items()}
    stale = dict.fromkeys(arrivals, 0)
    state = {m: ModelState(target=n, last_busy=0.0) for m, n in start.items()}
    for k in range(steps):
        t = k * step_s
        if fleet is not None and k % every == 0:
            decisions, state = decide({m: s.metrics(t) for m, s in sims.items()}, state, t, fleet)
            for m, d in decisions.items():
                if d.changed:
                    sims[m].scale_to(d.target, t)
                    targets[m].append((t, d.target, d.reason))
                    stale[m] += "SLO ->" in d.reason and t - sims[m].last_ready_s(t) <= STALE_SLO_S
        for m, sim in sims.items():
            sim.step(t, step_s, bounds[m][k], bounds[m][k + 1])
    return {m: _outcome(s, targets[m], stale[m], bounds[m][steps]) for m, s in sims.items()}


def _outcome(sim: ModelSim, targets: list[tuple[float, int, str]], stale: int, arrived: int) -> Outcome:
    none_ready = np.zeros(arrived, dtype=bool)
    none_ready[[i for i in sim.none_ready if i < arrived]] = True
    in_flight = sum(map(_running, sim.replicas)) + len(sim.queue)
    return Outcome(np.array(sim.ttft_s[:arrived]), none_ready, sim.gpu_s / 3600.0, arrived, sim.completed,
                   in_flight, targets, stale)


def summary(outcome: Outcome, slo_s: float, peak_gpu_hours: float) -> dict[str, float]:
    """One table row's numbers."""
    ttft = outcome.ttft_s
    met = np.nan_to_num(ttft, nan=math.inf) <= slo_s
    served = ttft[~np.isnan(ttft)]
    p50, p95, p99 = np.percentile(served, [50, 95, 99]) if len(served) else (math.nan,) * 3
    ups = sum(1 for a, b in zip(outcome.targets, outcome.targets[1:], strict=False) if b[1] > a[1])
    reversals = sum(1 for a, b, c in zip(outcome.targets, outcome.targets[1:], outcome.targets[2:], strict=False)
                    if b[1] < a[1] and c[1] > b[1] and c[0] - b[0] <= FLAP_WINDOW_S)
    return {
        "requests": outcome.arrivals, "slo": float(met.mean()) if len(met) else math.nan,
        "p50": p50, "p95": p95, "p99": p99, "gpu_h": outcome.gpu_hours, "ratio": outcome.gpu_hours / peak_gpu_hours,
        "changes": len(outcome.targets) - 1, "ups": ups, "reversals": reversals,
        "lost": outcome.arrivals - outcome.completed - outcome.in_flight_end, "in_flight": outcome.in_flight_end,
        "min_rep": min(n for _, n, _ in outcome.targets), "max_rep": max(n for _, n, _ in outcome.targets),
        "slo_ups": sum(1 for _, _, why in outcome.targets if "SLO ->" in why), "stale_slo_ups": outcome.stale_slo_ups,
        "to_zero": sum(1 for _, _, why in outcome.targets if "scale to zero" in why),
        "misses": int((~met).sum()), "misses_none_ready": int((~met & outcome.none_ready).sum()),
    }


def run_seed(seed: int, hours: float, step_s: float, gpu_pool: float | None = None,
             policies: Mapping[str, ModelPolicy] = POLICIES) -> dict[tuple[str, str], dict]:
    """Every fleet over one seed's traffic: {(model, fleet): summary}."""
    arrivals = {m: make_arrivals(TRAFFIC[m], hours, np.random.default_rng([seed, i]))
                for i, m in enumerate(MODELS)}
    peak = {m: replicas_for(float(a.rate_per_s.max()), a, MODELS[m], policies[m]) for m, a in arrivals.items()}
    mean = {m: replicas_for(float(a.rate_per_s.mean()), a, MODELS[m], policies[m]) for m, a in arrivals.items()}
    fleets = {"fixed at peak": dict(fixed=peak), "autoscaled (decide)": dict(fleet=Fleet(gpu_pool, policies)),
              "fixed at mean": dict(fixed=mean)}
    outcomes = {name: simulate(arrivals, hours=hours, step_s=step_s, **kw) for name, kw in fleets.items()}
    rows = {}
    for m in MODELS:
        peak_gpu_h = outcomes["fixed at peak"][m].gpu_hours
        for name in fleets:
            rows[(m, name)] = summary(outcomes[name][m], MODELS[m].ttft_slo_s, peak_gpu_h)
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds < 10 else f"{seconds:.0f} s"


def table(rows: Mapping[tuple[str, str], Mapping[str, float]]) -> str:
    lines = ["| model | fleet | replicas | requests | SLO met | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | GPU-h "
             "| GPU-h vs fixed at peak | replica changes | reversals <10 min | lost | in flight at end |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, name), r in rows.items():
        replicas = f"{r['min_rep']:.0f}" if r["min_rep"] == r["max_rep"] else f"{r['min_rep']:.0f}-{r['max_rep']:.0f}"
        lines.append(f"| {m} (SLO {MODELS[m].ttft_slo_s:g} s) | {name} | {replicas} | {r['requests']:.0f} "
                     f"| {100 * r['slo']:.2f}% | {_ms(r['p50'])} | {_ms(r['p95'])} | {_ms(r['p99'])} "
                     f"| {r['gpu_h']:.1f} | {r['ratio']:.2f} | {r['changes']:.0f} | {r['reversals']:.0f} "
                     f"| {r['lost']:.0f} | {r['in_flight']:.0f} |")
    return "\n".join(lines)


def medians(per_seed: list[dict[tuple[str, str], dict]]) -> dict[tuple[str, str], dict]:
    """Median of every number over the seeds; the replica range spans them all."""
    out = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        out[key] = {k: statistics.median(v[k] for v in values) for k in values[0]}
        out[key]["min_rep"] = min(v["min_rep"] for v in values)
        out[key]["max_rep"] = max(v["max_rep"] for v in values)
    return out


def seed_line(seed: int, rows: Mapping[tuple[str, str], Mapping[str, float]]) -> str:
    """What the autoscaled fleet did on one seed, and why it missed."""
    parts = []
    for m in MODELS:
        r = rows[(m, "autoscaled (decide)")]
        parts.append(f"{m} SLO {100 * r['slo']:.2f}% at {r['ratio']:.2f}x the fixed-at-peak GPU-h, {r['ups']:.0f} ups "
                     f"({r['slo_ups']:.0f} by the TTFT override, {r['stale_slo_ups']:.0f} of them within "
                     f"{STALE_SLO_S:g} s of a replica coming up), {r['to_zero']:.0f} to zero, {r['misses']:.0f} "
                     f"misses ({r['misses_none_ready']:.0f} arrived with no replica ready)")
    return f"seed {seed}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=5, help="seeds seed, seed+1, ...; the table shows medians")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--step-s", type=float, default=1.0)
    parser.add_argument("--gpu-pool", type=float, default=None, help="GPUs both models may use together")
    parser.add_argument("--scale-up-window-s", type=float, default=None,
                        help="override both policies' scale_up_window_s (default: theirs, 0)")
    args = parse_args_with_smoke(parser, argv, hours=1.0, seeds=1)
    policies = dict(POLICIES)
    if args.scale_up_window_s is not None:
        policies = {m: replace(p, scale_up_window_s=args.scale_up_window_s) for m, p in POLICIES.items()}
    if args.hours <= 0 or args.step_s <= 0 or args.seeds < 1 or args.step_s > CONTROL_INTERVAL_S:
        parser.error(f"need hours > 0, 0 < step-s <= {CONTROL_INTERVAL_S:g}, seeds >= 1")
    began = time.perf_counter()
    per_seed = []
    for seed in range(args.seed, args.seed + args.seeds):
        per_seed.append(run_seed(seed, args.hours, args.step_s, args.gpu_pool, policies))
        print(seed_line(seed, per_seed[-1]), flush=True)
    pool = "unlimited" if args.gpu_pool is None else f"{args.gpu_pool:g}"
    windows = ", ".join(f"{m} {p.scale_up_window_s:g} s" for m, p in policies.items())
    print(f"\n{args.hours:g} h, step {args.step_s:g} s, control every {CONTROL_INTERVAL_S:g} s, GPU pool {pool}, "
          f"scale-up windows {windows}; medians of {args.seeds} seed(s) from {args.seed}:\n")
    print(table(medians(per_seed)))
    print(f"\nsimulated in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
