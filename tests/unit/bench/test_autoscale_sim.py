"""bench/autoscale_sim.py on short horizons: the fleets it compares, cold starts, drains, nothing lost."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[3] / "bench" / "autoscale_sim.py"
_spec = importlib.util.spec_from_file_location("autoscale_sim", PATH)
assert _spec is not None and _spec.loader is not None
sim = importlib.util.module_from_spec(_spec)
sys.modules["autoscale_sim"] = sim
_spec.loader.exec_module(sim)

HOURS = 3.0  # a business day squeezed into 3 h: the hump runs from 0.5 h to 2.5 h


def short_day(seed: int, bursts_per_day: float = 0.0) -> dict:
    traffic = {m: replace(t, day_start_h=0.5, day_end_h=2.5, bursts_per_day=bursts_per_day)
               for m, t in sim.TRAFFIC.items()}
    return {m: sim.make_arrivals(traffic[m], HOURS, np.random.default_rng([seed, i]))
            for i, m in enumerate(sim.MODELS)}


def fleets(arrivals: dict) -> dict:
    peak = {m: sim.replicas_for(float(a.rate_per_s.max()), a, sim.MODELS[m], sim.POLICIES[m])
            for m, a in arrivals.items()}
    mean = {m: sim.replicas_for(float(a.rate_per_s.mean()), a, sim.MODELS[m], sim.POLICIES[m])
            for m, a in arrivals.items()}
    return {"peak": sim.simulate(arrivals, hours=HOURS, step_s=1.0, fixed=peak),
            "auto": sim.simulate(arrivals, hours=HOURS, step_s=1.0, fleet=sim.Fleet(None, sim.POLICIES)),
            "mean": sim.simulate(arrivals, hours=HOURS, step_s=1.0, fixed=mean)}


@pytest.fixture(scope="module")
def day() -> dict:
    return fleets(short_day(seed=7))


def test_autoscaled_stays_within_its_bounds_and_follows_the_hump(day):
    for m, policy in sim.POLICIES.items():
        targets = [n for _, n, _ in day["auto"][m].targets]
        assert all(policy.min_replicas <= n <= policy.max_replicas for n in targets), (m, targets)
        assert max(targets) >= 2, f"{m} never scaled up for the hump: {targets}"
        assert targets[-1] < max(targets), f"{m} never scaled back down after it: {targets}"


def test_autoscaled_uses_fewer_gpu_hours_than_fixed_at_peak_and_keeps_the_slo(day):
    for m, model in sim.MODELS.items():
        auto, peak = day["auto"][m], day["peak"][m]
        assert auto.gpu_hours < 0.8 * peak.gpu_hours, (m, auto.gpu_hours, peak.gpu_hours)
        slo = sim.summary(auto, model.ttft_slo_s, peak.gpu_hours)["slo"]
        assert slo > 0.97, f"{m}: {slo:.3f} of requests within the SLO on a day without bursts"


def test_under_provisioning_costs_slo(day):
    scout = sim.MODELS["scout"]
    peak = sim.summary(day["peak"]["scout"], scout.ttft_slo_s, 1.0)
    mean = sim.summary(day["mean"]["scout"], scout.ttft_slo_s, 1.0)
    assert peak["slo"] > 0.99 and mean["slo"] < peak["slo"] - 0.1, (peak["slo"], mean["slo"])
    assert mean["p99"] > 60, "a queue built up at the peak"


def test_no_request_is_lost_in_any_fleet(day):
    for name, outcomes in day.items():
        for m, outcome in outcomes.items():
            assert outcome.arrivals > 0 and outcome.completed > 0
            assert outcome.completed + outcome.in_flight_end == outcome.arrivals, (name, m)
            started = ~np.isnan(outcome.ttft_s)
            assert started.sum() >= outcome.completed, "every completed request had a first token"


def one_burst(requests: int, output_tokens: int) -> sim.Arrivals:
    """`requests` arriving together at 0.5 s, each decoding `output_tokens`."""
    return sim.Arrivals(at_s=np.full(requests, 0.5), prompt_tokens=np.full(requests, 100, dtype=np.int64),
                        output_tokens=np.full(requests, output_tokens, dtype=np.int64), rate_per_s=np.zeros(1))


def run_until(model_sim, t_end: float, arrivals: sim.Arrivals, step_s: float = 1.0, t_start: float = 0.0) -> None:
    for k in range(round(t_start / step_s), round(t_end / step_s)):
        t = k * step_s
        first, end = (np.searchsorted(arrivals.at_s, [t, t + step_s])).tolist()
        model_sim.step(t, step_s, first, end)


def test_cold_starts_delay_capacity():
    scout = sim.MODELS["scout"]
    arrivals = one_burst(requests=3 * scout.max_running, output_tokens=100_000)  # nobody finishes
    model_sim = sim.ModelSim(scout, arrivals, replicas=1)
    model_sim.scale_to(3, now=0.0)
    run_until(model_sim, scout.cold_start_s - 1, arrivals)
    m = model_sim.metrics(scout.cold_start_s - 1)
    assert (m.ready, m.starting) == (1, 2)
    assert (m.running, m.queued) == (scout.max_running, 2 * scout.max_running), "the starting ones serve nobody"
    run_until(model_sim, scout.cold_start_s + 2, arrivals, t_start=scout.cold_start_s - 1)
    m = model_sim.metrics(scout.cold_start_s + 2)
    assert (m.ready, m.starting, m.running, m.queued) == (3, 0, 3 * scout.max_running, 0)
    waited = np.array(model_sim.ttft_s)[scout.max_running:]
    assert waited.min() >= scout.cold_start_s - 0.5, "the queued ones waited for the cold start"
    assert model_sim.gpu_s == pytest.approx(3 * scout.gpus_per_replica * (scout.cold_start_s + 2)), \
        "a starting replica holds its GPUs"


def test_a_removed_replica_drains_then_frees_its_gpus():
    scout = sim.MODELS["scout"]
    arrivals = one_burst(requests=20, output_tokens=200)
    model_sim = sim.ModelSim(scout, arrivals, replicas=2)
    run_until(model_sim, 2.0, arrivals)
    assert [len(r.finish_at_tokens) for r in model_sim.replicas] == [10, 10], "the router balances"
    model_sim.scale_to(1, now=2.0)
    m = model_sim.metrics(2.0)
    assert (m.ready, m.running) == (1, 20), "the drained one stops admitting but keeps its requests"
    assert len(model_sim.replicas) == 2
    run_until(model_sim, 30.0, arrivals, t_start=2.0)
    assert model_sim.completed == 20 and len(model_sim.replicas) == 1, "done, and only then released"


def test_the_same_seed_gives_the_same_day_and_another_seed_another(capsys):
    a, b = sim.run_seed(3, 0.5, 1.0), sim.run_seed(3, 0.5, 1.0)
    assert repr(a) == repr(b)  # repr: a model with no request has nan percentiles
    assert sim.run_seed(4, 0.5, 1.0)[("scout", "autoscaled (decide)")]["requests"] != a[
        ("scout", "autoscaled (decide)")]["requests"]
    assert sim.main(["--hours", "0.25", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    for fleet in ("fixed at peak", "autoscaled (decide)", "fixed at mean"):
        assert out.count(f"| {fleet} |") == 2, fleet
