"""The autoscaling policy with fake time: bursts, ramps, cold starts, a full GPU pool, flapping metrics."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from herd.platform.controlplane.policy import Fleet, ModelMetrics, ModelPolicy, decide

SCOUT = ModelPolicy(min_replicas=1, max_replicas=6, target_requests_per_replica=32, ttft_slo_s=2.0,
                    scale_down_window_s=300, gpus_per_replica=1, priority=1)


def run(trace, policy=SCOUT, step_s=10.0, pool=None, name="scout"):
    """Feed a list of ModelMetrics (one per step) through the policy; the targets it set, step by step."""
    fleet = Fleet(gpu_pool=pool, policies={name: policy})
    state, targets, reasons = {}, [], []
    for i, metrics in enumerate(trace):
        decisions, state = decide({name: metrics}, state, now=i * step_s, fleet=fleet)
        targets.append(decisions[name].target)
        reasons.append(decisions[name].reason)
    return targets, reasons


def test_a_burst_scales_up_at_once_and_down_only_after_the_window():
    quiet, burst = [ModelMetrics(running=5)], [ModelMetrics(running=64, queued=200)]
    trace = quiet * 6 + burst * 6 + quiet * 40
    targets, reasons = run(trace)
    assert targets[5] == 1 and targets[6] == 6, "up within one step, capped at max"
    assert "clamped" in reasons[6]
    assert targets[12:12 + 29] == [6] * 29, "held for the 300 s scale-down window"
    assert targets[-1] == 1


def test_a_diurnal_ramp_tracks_demand_without_flapping_and_never_below_need():
    minutes = 24 * 60
    demand = [int(100 + 90 * math.sin(2 * math.pi * m / minutes)) for m in range(minutes)]
    targets, _ = run([ModelMetrics(running=d) for d in demand], step_s=60)
    for d, t in zip(demand, targets, strict=True):
        assert t >= min(math.ceil(d / 32), SCOUT.max_replicas), "below what in-flight requests need"
        assert SCOUT.min_replicas <= t <= SCOUT.max_replicas
    changes = sum(1 for a, b in itertools.pairwise(targets) if a != b)
    assert changes <= 2 * (SCOUT.max_replicas - SCOUT.min_replicas) + 2, f"{changes} changes in a day"


def test_flapping_metrics_do_not_make_it_flap():
    trace = [ModelMetrics(running=70 if i % 2 else 30) for i in range(200)]
    targets, _ = run(trace)
    assert set(targets[1:]) == {3}, "the slow down-window keeps the peak"


def test_cold_starts_count_as_coming_not_missing():
    slow = [ModelMetrics(running=20, ttft_p95_s=5.0, ready=1, starting=1)] * 30  # minutes of loading
    targets, reasons = run([ModelMetrics(running=20, ttft_p95_s=5.0, ready=1), *slow])
    assert targets[0] == 2 and "SLO" in reasons[0]
    assert set(targets[1:]) == {2}, "no more replicas while one is still starting"
    assert "already starting" in reasons[1]
    after, _ = run([ModelMetrics(running=20, ttft_p95_s=5.0, ready=2)] * 3)
    assert after == [2, 3, 4], "once up, a breach that persists adds one at a time"


def test_scale_to_zero_only_after_the_idle_period_and_back_on_demand():
    policy = ModelPolicy(min_replicas=0, max_replicas=3, idle_to_zero_s=900, scale_down_window_s=60)
    trace = [ModelMetrics(running=10)] * 3 + [ModelMetrics()] * 100 + [ModelMetrics(queued=1)]
    targets, reasons = run(trace, policy=policy)
    first_zero = targets.index(0)
    assert (first_zero - 2) * 10 >= 900, "not before 900 s idle"
    assert "scale to zero" in reasons[first_zero]
    assert targets[-1] == 1, "a request for a model at zero starts one replica"


def test_a_full_gpu_pool_serves_the_higher_priority_model_first():
    maverick = ModelPolicy(min_replicas=1, max_replicas=2, target_requests_per_replica=16, gpus_per_replica=8,
                           priority=0)
    fleet = Fleet(gpu_pool=12, policies={"scout": SCOUT, "maverick": maverick})
    busy = {"scout": ModelMetrics(running=200), "maverick": ModelMetrics(running=100)}
    decisions, _ = decide(busy, {}, 0.0, fleet)
    assert decisions["scout"].target == 4 and decisions["maverick"].target == 1
    assert "GPU pool full" in decisions["scout"].reason, "scout wanted 6; its minimum and maverick's came first"
    assert 4 * 1 + 1 * 8 <= 12
    quiet = {"scout": ModelMetrics(running=200), "maverick": ModelMetrics()}
    decisions, _ = decide(quiet, {}, 0.0, Fleet(gpu_pool=7, policies={"scout": SCOUT, "maverick": maverick}))
    assert decisions["scout"].target == 6 and decisions["maverick"].target == 0


@pytest.mark.parametrize("bad", [dict(min_replicas=3, max_replicas=2), dict(max_replicas=0),
                                 dict(target_requests_per_replica=0)])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        ModelPolicy(**bad)


def test_a_token_target_scales_for_long_requests_that_few_requests_would_not():
    policy = ModelPolicy(min_replicas=1, max_replicas=8, target_requests_per_replica=32,
                         target_tokens_per_replica=100_000)
    targets, reasons = run([ModelMetrics(running=4, in_flight_tokens=350_000)], policy=policy)
    assert targets == [4] and "350000 tokens" in reasons[0]
    by_requests, _ = run([ModelMetrics(running=4, in_flight_tokens=350_000)])
    assert by_requests == [1], "without a token target four requests fit one replica"


def test_refused_requests_bring_a_model_back_from_zero_and_keep_it_busy():
    policy = ModelPolicy(min_replicas=0, max_replicas=2, idle_to_zero_s=60, scale_down_window_s=0)
    trace = [ModelMetrics()] * 8 + [ModelMetrics(refused_cold=1)] * 2 + [ModelMetrics()] * 3
    targets, reasons = run(trace, policy=policy)
    assert targets[7] == 0, "idle long enough: at zero"
    assert targets[8] == 1 and "refused for want of a replica" in reasons[8]
    assert targets[-1] == 1, "a refusal is activity: the idle clock starts again"


def test_the_waits_of_a_cold_start_that_just_ended_do_not_add_a_replica():
    # Scaled from zero: the first replica is ready, and the p95 of the last minute is its cold start's wait.
    policy = ModelPolicy(min_replicas=0, max_replicas=4, ttft_slo_s=4.0, ttft_window_s=60)
    loading = [ModelMetrics(queued=1, ready=0, starting=1)] * 3
    served = [ModelMetrics(running=1, ttft_p95_s=485.0, ready=1)] * 6  # 60 s of the window
    late = [ModelMetrics(running=1, ttft_p95_s=485.0, ready=1)]
    targets, reasons = run(loading + served + late, policy=policy)
    assert targets[:9] == [1] * 9, "no second replica for the wait that has already ended"
    assert "became ready" in reasons[3]
    assert targets[9] == 2 and "SLO" in reasons[9], "a breach that outlasts the window still counts"


def test_scale_to_zero_comes_after_the_idle_period_not_idle_plus_the_down_window():
    policy = ModelPolicy(min_replicas=0, max_replicas=3, idle_to_zero_s=300, scale_down_window_s=600)
    targets, _ = run([ModelMetrics(running=40)] + [ModelMetrics()] * 40, policy=policy)
    assert targets.index(0) * 10 == 300


DECODE = ModelPolicy(min_replicas=1, max_replicas=4, target_requests_per_replica=32, ttft_slo_s=None,
                     itl_slo_s=0.05, itl_window_s=60, kv_use_high_water=0.9, scale_down_window_s=60)


def test_inter_token_latency_over_its_slo_adds_one_replica_at_a_time_as_ttft_does():
    slow = ModelMetrics(running=10, itl_p95_s=0.08, ready=1)
    targets, reasons = run([slow, ModelMetrics(running=10, itl_p95_s=0.08, ready=1, starting=1), slow], policy=DECODE)
    assert targets == [2, 2, 3]
    assert "ITL p95 80ms over the 50ms SLO -> 2" in reasons[0]
    assert "ITL over SLO, 1 replica(s) already starting" in reasons[1]
    fine, _ = run([ModelMetrics(running=10, itl_p95_s=0.04, ready=1)] * 3, policy=DECODE)
    assert fine == [1, 1, 1]


def test_itl_waits_of_a_replica_just_ready_do_not_add_another():
    policy = replace(DECODE, scale_down_window_s=600)
    trace = [ModelMetrics(running=10, itl_p95_s=0.2, ready=r) for r in (1, 2, 2, 2, 2, 2, 2, 2)]
    targets, reasons = run(trace, policy=policy)
    assert targets[:7] == [2] * 7, "the p95 of the minute before the second replica was ready"
    assert "ITL over SLO, but a replica became ready" in reasons[1]
    assert targets[7] == 3, "past the ITL window a breach counts again"


def test_kv_use_over_its_high_water_adds_a_replica_and_is_read_now_not_over_a_window():
    full = ModelMetrics(running=10, kv_use=0.95, ready=1)
    targets, reasons = run([full, ModelMetrics(running=10, kv_use=0.95, ready=2)], policy=DECODE)
    assert targets == [2, 3], "a replica just ready does not hold KV use back: it is now, not a minute's p95"
    assert "KV use 95% over the 90% high-water -> 2" in reasons[0]
    idle_but_cached, _ = run([ModelMetrics(kv_use=0.99, ready=1)], policy=DECODE)
    assert idle_but_cached == [1], "no demand, no override"


def test_each_limit_is_off_unless_the_policy_sets_it():
    prefill = ModelPolicy(min_replicas=1, max_replicas=4, ttft_slo_s=2.0)  # ITL and KV: off by default
    targets, reasons = run([ModelMetrics(running=1, itl_p95_s=1.0, kv_use=1.0, ready=1)], policy=prefill)
    assert targets == [1] and "ITL" not in reasons[0] and "KV" not in reasons[0]
    targets, _ = run([ModelMetrics(running=1, ttft_p95_s=30.0, ready=1)], policy=DECODE)
    assert targets == [1], "the decode pool's policy sets no TTFT SLO"


@pytest.mark.parametrize("bad", [0.0, 1.5])
def test_a_kv_high_water_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ValueError, match="kv_use_high_water"):
        ModelPolicy(kv_use_high_water=bad)
