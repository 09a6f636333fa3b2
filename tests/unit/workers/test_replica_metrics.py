"""A replica's /metrics listens where the telemetry settings say: loopback unless opened."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from herd.workers.model_replica import ModelReplica
from herd.workers.replica_config import ReplicaArgs
from herd.workers.replica_metrics import ReplicaMetrics
from tests.unit.workers.network import listening_hosts, refused_on_the_network


def _serve_metrics(args: dict[str, Any]) -> int:
    """ModelReplica._serve_metrics on a replica whose engine is never scraped here."""
    replica = SimpleNamespace(args=ReplicaArgs.model_validate(args),
                              core=SimpleNamespace(metrics=ReplicaMetrics("scout", None, None)))  # type: ignore[arg-type]
    port = ModelReplica.func_or_class._serve_metrics(replica, 0)  # type: ignore[attr-defined]
    assert port is not None
    return int(port)


def test_replica_metrics_bind_loopback_by_default() -> None:
    port = _serve_metrics({})
    assert listening_hosts(port) == {"127.0.0.1"}
    assert refused_on_the_network(port)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_replica_metrics_bind_the_configured_host(host: str) -> None:
    port = _serve_metrics({"telemetry": {"replica_metrics_host": host}})
    assert listening_hosts(port) == {host}


def test_replica_metrics_export_the_host_kv_tier_and_the_lora_bank() -> None:
    from herd.engine.stats import EngineStats
    from herd.workers.replica_metrics import _EngineCollector

    stats = EngineStats(running=0, waiting=0, kv_blocks={"full": 8}, kv_blocks_used={"full": 0},
                        prefix_queried_tokens=100, prefix_hit_tokens=64, preemptions=0, host_kv_blocks=10,
                        host_kv_blocks_held=7, host_kv_hit_blocks=5, host_kv_hit_tokens=48,
                        host_kv_saved_bytes=4096, host_kv_restored_bytes=2048, lora_adapters_registered=5,
                        lora_adapters_resident=2, lora_adapter_loads=9, lora_adapter_evictions=7)
    engine = SimpleNamespace(stats=lambda: stats)
    collector = _EngineCollector("scout", engine, SimpleNamespace(snapshot=dict))  # type: ignore[arg-type]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    model = (("model", "scout"),)
    assert samples[("herd_replica_host_kv_blocks", model)] == 10
    assert samples[("herd_replica_host_kv_blocks_held", model)] == 7
    assert samples[("herd_replica_host_kv_hits_blocks_total", model)] == 5
    assert samples[("herd_replica_host_kv_hits_tokens_total", model)] == 48
    assert samples[("herd_replica_host_kv_moved_bytes_total", (("direction", "to_host"), *model))] == 4096
    assert samples[("herd_replica_host_kv_moved_bytes_total", (("direction", "to_device"), *model))] == 2048
    assert samples[("herd_replica_lora_adapters_registered", model)] == 5
    assert samples[("herd_replica_lora_adapters_resident", model)] == 2
    assert samples[("herd_replica_lora_adapter_loads_total", model)] == 9
    assert samples[("herd_replica_lora_adapter_evictions_total", model)] == 7


def test_replica_metrics_export_failed_steps_and_holds() -> None:
    from herd.engine.stats import EngineStats
    from herd.workers.replica_metrics import _EngineCollector

    stats = EngineStats(running=2, waiting=1, kv_blocks={"full": 8}, kv_blocks_used={"full": 3},
                        prefix_queried_tokens=0, prefix_hit_tokens=0, preemptions=0, fault_failed_steps=12,
                        fault_holds=3, fault_recoveries=2, fault_last_recovery_s=4.5, fault_held=True)
    engine = SimpleNamespace(stats=lambda: stats)
    collector = _EngineCollector("scout", engine, SimpleNamespace(snapshot=dict))  # type: ignore[arg-type]
    samples = {s.name: s.value for family in collector.collect() for s in family.samples if s.name.startswith(
        "herd_replica_fault")}
    assert samples == {"herd_replica_fault_failed_steps_total": 12, "herd_replica_fault_holds_total": 3,
                       "herd_replica_fault_recoveries_total": 2, "herd_replica_fault_last_recovery_seconds": 4.5,
                       "herd_replica_fault_held": 1}


def test_a_replica_of_several_trunks_exports_each_trunks_kv_use_and_requests(tmp_path) -> None:
    from herd.engine import EngineConfig, LLMEngine, SamplingParams
    from herd.engine.trunk_group import TrunkGroup
    from herd.model.tiny import make_tiny
    from herd.workers.replica_metrics import _EngineCollector

    path = make_tiny(tmp_path / "scout", preset="scout", seed=1)
    group = TrunkGroup([LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=8)) for _ in range(2)])
    try:
        group.add_request(list(range(5, 40)), SamplingParams(max_tokens=8, ignore_eos=True))
        group.step()  # trunk 0 holds the request's blocks; trunk 1 nothing
        collector = _EngineCollector("scout", group, SimpleNamespace(snapshot=dict))  # type: ignore[arg-type]
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in collector.collect() for s in family.samples if "trunk" in s.name}
    finally:
        group.close()
    assert samples[("herd_replica_trunk_requests", (("model", "scout"), ("trunk", "0")))] == 1
    assert samples[("herd_replica_trunk_requests", (("model", "scout"), ("trunk", "1")))] == 0
    full = (("group", "full"), ("model", "scout"))
    assert samples[("herd_replica_trunk_kv_cache_usage_ratio", (*full, ("trunk", "0")))] > 0
    assert samples[("herd_replica_trunk_kv_cache_usage_ratio", (*full, ("trunk", "1")))] == 0
