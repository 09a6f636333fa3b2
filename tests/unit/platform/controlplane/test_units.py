"""A disaggregated model as two scaled units: each pool's share of the model's load, and its policy from the
settings (TTFT drives the prefill pool alone; ITL and KV use the decode pool alone)."""

from __future__ import annotations

from herd.platform.controlplane.app import fleet, units
from herd.platform.controlplane.policy import ModelMetrics, decide
from herd.platform.controlplane.units import Unit, colocated, pool, unit_metrics
from herd.platform.settings import HerdSettings

POOLS = {"prefill_autoscale": {"min_replicas": 1, "max_replicas": 4, "target_requests_per_replica": 4,
                               "ttft_slo_s": 1.0},
         "decode_autoscale": {"min_replicas": 1, "max_replicas": 4, "target_requests_per_replica": 16,
                              "itl_slo_s": 0.05, "kv_use_high_water": 0.9, "scale_down_window_s": 0}}


def _settings(gpu_pool=16):
    return HerdSettings.load(controlplane={"enabled": True, "gpu_pool": gpu_pool}, models=[
        {"name": "scout", "path": "scout", "shards": 0, "disaggregation": POOLS,
         "deployment": {"gpus": True, "trunk_gpus": 2}},
        {"name": "maverick", "path": "maverick", "shards": 0, "autoscale": {"max_replicas": 2}}])


def test_a_disaggregated_model_is_two_units_and_a_colocated_one_is_one():
    scaled = units(_settings())
    assert {name: unit for name, (unit, _) in scaled.items()} == {
        "scout-prefill": Unit("scout", "scout-prefill", "prefill"),
        "scout-decode": Unit("scout", "scout-decode", "decode"), "maverick": Unit("maverick", "maverick")}
    prefill, decode = scaled["scout-prefill"][1], scaled["scout-decode"][1]
    assert (prefill.ttft_slo_s, prefill.itl_slo_s, prefill.kv_use_high_water) == (1.0, None, None)
    assert (decode.ttft_slo_s, decode.itl_slo_s, decode.kv_use_high_water) == (None, 0.05, 0.9)
    assert prefill.min_replicas == decode.min_replicas == 1, "a pool is never scaled to zero"
    assert prefill.gpus_per_replica == decode.gpus_per_replica == 2, "each pool replica is a whole model replica"


def test_each_pool_takes_its_share_of_the_models_load():
    load = ModelMetrics(running=18, queued=2, awaiting_first_token=7, in_flight_tokens=9000, ttft_p95_s=3.0,
                        itl_p95_s=0.02, kv_use=0.5, ready=9, starting=1)
    prefill = unit_metrics(pool("scout", "prefill"), load)
    assert (prefill.running, prefill.queued, prefill.demand) == (5, 2, 7), "what waits for its first token"
    assert (prefill.ttft_p95_s, prefill.itl_p95_s, prefill.kv_use, prefill.in_flight_tokens) == (3.0, None, None, 0)
    decode = unit_metrics(pool("scout", "decode"), load)
    assert (decode.demand, decode.in_flight_tokens, decode.itl_p95_s, decode.kv_use) == (20, 9000, 0.02, 0.5)
    assert decode.ttft_p95_s is None
    assert unit_metrics(colocated("scout"), load) == load


def _decide(load, gpu_pool=16):
    settings = _settings(gpu_pool)
    scaled = units(settings)
    loads = {"scout": load}  # maverick: idle
    metrics = {name: unit_metrics(unit, loads.get(unit.model, ModelMetrics())) for name, (unit, _) in scaled.items()}
    decisions, _ = decide(metrics, {}, 0.0, fleet(settings))
    return decisions


def test_ttft_over_its_slo_scales_the_prefill_pool_and_not_the_decode_pool():
    decisions = _decide(ModelMetrics(running=4, awaiting_first_token=2, ttft_p95_s=5.0, itl_p95_s=0.01, ready=1))
    prefill = decisions["scout-prefill"]
    assert prefill.target == 2 and "TTFT p95 5.00s over the 1s SLO" in prefill.reason
    assert decisions["scout-decode"].target == 1 and "TTFT" not in decisions["scout-decode"].reason


def test_itl_and_kv_use_scale_the_decode_pool_and_not_the_prefill_pool():
    for signal, reason in (({"itl_p95_s": 0.2}, "ITL p95 200ms over the 50ms SLO"),
                           ({"kv_use": 0.97}, "KV use 97% over the 90% high-water")):
        decisions = _decide(ModelMetrics(running=4, awaiting_first_token=1, ttft_p95_s=0.1, ready=1, **signal))
        assert decisions["scout-decode"].target == 2 and reason in decisions["scout-decode"].reason
        assert decisions["scout-prefill"].target == 1


def test_requests_size_each_pool_by_its_own_target_within_its_bounds():
    decisions = _decide(ModelMetrics(running=60, awaiting_first_token=30, ready=1))
    assert decisions["scout-prefill"].target == 4, "30 waiting for a first token / 4 per replica, clamped at 4"
    assert "clamped to [1, 4]" in decisions["scout-prefill"].reason
    assert decisions["scout-decode"].target == 4, "60 in flight / 16 per replica"
    assert decisions["maverick"].target == 1, "another model's load is its own"


def test_the_gpu_pool_counts_both_pools_replicas():
    decisions = _decide(ModelMetrics(running=200, awaiting_first_token=100, ready=1), gpu_pool=12)
    prefill, decode = decisions["scout-prefill"], decisions["scout-decode"]
    assert (prefill.target, decode.target) == (2, 4), "each pool's minimum first, then the targets by name"
    assert "GPU pool full: 2 of 4 granted" in prefill.reason
