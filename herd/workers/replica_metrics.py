"""A model replica's Prometheus metrics: what its engine holds, how requests spent their time in it, and
how its experts are loaded. One registry per replica, served on its own port (`serve_metrics`).

Gauges are read from the engine at scrape time (nothing to keep in step); the request histograms are
observed when a request finishes, from the engine's own timestamps, and its speculative decoding by tenant
(SpeculativeMetrics) when each of its choices finishes. Names are in docs/METRICS.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from herd.engine import LLMEngine
from herd.engine.outputs import RequestTimes
from herd.engine.stats import EngineStats
from herd.engine.trunk_group import TrunkGroup
from herd.workers.expert_load import ExpertLoad
from herd.workers.speculative_metrics import SpeculativeMetrics

PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ReplicaMetrics:
    def __init__(self, model: str, engine: LLMEngine | TrunkGroup, expert_load: ExpertLoad) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Histogram("herd_replica_queue_seconds", "From arrival at the engine to first scheduled",
                               ["model"], buckets=PHASE_BUCKETS, registry=r).labels(model)
        self.prefill = Histogram("herd_replica_prefill_seconds", "From first scheduled to the first token",
                                 ["model"], buckets=PHASE_BUCKETS, registry=r).labels(model)
        self.decode = Histogram("herd_replica_decode_seconds", "From the first token to the end",
                                ["model"], buckets=PHASE_BUCKETS, registry=r).labels(model)
        self.dispatch = Histogram("herd_expert_dispatch_seconds", "One MoE layer's routed experts, dispatch to "
                                  "combine-ready (over the shards' transport, or in the trunk)", ["model"],
                                  buckets=DISPATCH_BUCKETS, registry=r).labels(model)
        self.replacements = Counter("herd_expert_replacements", "Live expert re-placements applied (expert "
                                    "balancing)", ["model"], registry=r).labels(model)
        self.shard_restarts = Counter("herd_replica_shard_restarts", "Expert shards restarted in place (their "
                                      "process died; the replica held its steps meanwhile)", ["model"],
                                      registry=r).labels(model)
        self.shard_recovery = Histogram("herd_replica_shard_recovery_seconds", "From a shard's death noticed to it "
                                        "serving again (process restart, experts loaded, transport reconnected)",
                                        ["model"], buckets=PHASE_BUCKETS, registry=r).labels(model)
        self.shard_recovering = Gauge("herd_replica_shard_recovering", "1 while an expert shard of the replica is "
                                      "being restarted in place", ["model"], registry=r).labels(model)
        self.speculative = SpeculativeMetrics(model, r)
        r.register(_EngineCollector(model, engine, expert_load))

    def finished(self, times: RequestTimes) -> None:
        """A request ended: observe the phases it reached."""
        if times.scheduled_ns:
            self.queue.observe((times.scheduled_ns - times.arrived_ns) / 1e9)
            if times.first_token_ns:
                self.prefill.observe((times.first_token_ns - times.scheduled_ns) / 1e9)
                self.decode.observe((times.finished_ns - times.first_token_ns) / 1e9)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: a free port; loopback unless told, as the labels name every model's
        load); returns the port bound."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class _EngineCollector(Collector):
    def __init__(self, model: str, engine: LLMEngine | TrunkGroup, expert_load: ExpertLoad) -> None:
        self.model, self.engine, self.expert_load = model, engine, expert_load

    def collect(self) -> Iterator[Any]:
        stats, model = self.engine.stats(), [self.model]
        running = _series(GaugeMetricFamily, "herd_replica_requests_running", "Requests holding KV blocks", model,
                          stats.running)
        waiting = _series(GaugeMetricFamily, "herd_replica_requests_waiting", "Requests queued for the engine (queue "
                          "depth)", model, stats.waiting)
        usage = GaugeMetricFamily("herd_replica_kv_cache_usage_ratio", "KV blocks in use, of the pool (per layer "
                                  "group: full attention, chunked)", labels=["model", "group"])
        for group, blocks in stats.kv_blocks.items():
            usage.add_metric([self.model, group], stats.kv_blocks_used[group] / max(1, blocks))
        queried = _series(CounterMetricFamily, "herd_replica_prefix_cache_queries_tokens", "Prompt tokens looked up "
                          "in the prefix cache", model, stats.prefix_queried_tokens)
        hits = _series(CounterMetricFamily, "herd_replica_prefix_cache_hits_tokens", "Prompt tokens found in the "
                       "prefix cache (hit rate: hits / queries)", model, stats.prefix_hit_tokens)
        preempted = _series(CounterMetricFamily, "herd_replica_preemptions", "Requests preempted for KV blocks", model,
                            stats.preemptions)
        experts = CounterMetricFamily("herd_expert_tokens", "Tokens routed to each expert of each MoE layer",
                                      labels=["model", "layer", "expert"])
        for layer, counts in self.expert_load.snapshot().items():
            for expert, count in enumerate(counts):
                experts.add_metric([self.model, str(layer), str(expert)], count)
        drafted = _series(CounterMetricFamily, "herd_replica_speculative_draft_tokens", "Draft tokens verified by "
                          "the model (speculative decoding), every request", model, stats.draft_tokens)
        accepted = _series(CounterMetricFamily, "herd_replica_speculative_accepted_tokens", "Draft tokens the model "
                           "agreed with, every request", model, stats.accepted_tokens)
        yield from (running, waiting, usage, queried, hits, preempted, experts, drafted, accepted)
        yield from self._host_tier(stats)
        yield from self._lora(stats)
        yield from self._faults(stats)
        yield from self._trunks()

    def _trunks(self) -> Iterator[Any]:
        """Each trunk's KV use and requests, for a replica of several (issue 28): the replica's series sum them, and
        lockstep makes a step as slow as its busiest trunk, so an imbalance shows here."""
        if not isinstance(self.engine, TrunkGroup):
            return
        usage = GaugeMetricFamily("herd_replica_trunk_kv_cache_usage_ratio", "KV blocks in use of each trunk's pool "
                                  "(per layer group)", labels=["model", "trunk", "group"])
        requests = GaugeMetricFamily("herd_replica_trunk_requests", "Requests on each trunk (running and waiting)",
                                     labels=["model", "trunk"])
        for trunk, engine in enumerate(self.engine.engines):
            stats = engine.stats()
            for group, blocks in stats.kv_blocks.items():
                usage.add_metric([self.model, str(trunk), group], stats.kv_blocks_used[group] / max(1, blocks))
            requests.add_metric([self.model, str(trunk)], stats.running + stats.waiting)
        yield from (usage, requests)

    def _lora(self, stats: EngineStats) -> Iterator[Any]:
        """The LoRA adapter bank's series (all zero with LoRA off): registered, resident, loads and evictions."""
        return self._by_model(
            (GaugeMetricFamily, "herd_replica_lora_adapters_registered", "LoRA adapters registered on the replica "
             "(loaded on the host)", stats.lora_adapters_registered),
            (GaugeMetricFamily, "herd_replica_lora_adapters_resident", "LoRA adapters in the adapter bank (at most "
             "max_loras)", stats.lora_adapters_resident),
            (CounterMetricFamily, "herd_replica_lora_adapter_loads", "LoRA adapters loaded into the bank",
             stats.lora_adapter_loads),
            (CounterMetricFamily, "herd_replica_lora_adapter_evictions", "LoRA adapters evicted from the bank to make "
             "room for another", stats.lora_adapter_evictions))

    def _faults(self, stats: EngineStats) -> Iterator[Any]:
        """Steps that failed for want of the experts, and the engine's holds on their requests (fault_hold_s)."""
        return self._by_model(
            (CounterMetricFamily, "herd_replica_fault_failed_steps", "Engine steps whose forward failed (an expert "
             "shard unreachable or past its deadline)", stats.fault_failed_steps),
            (CounterMetricFamily, "herd_replica_fault_holds", "Holds begun: a failed step's requests kept and retried "
             "instead of failed", stats.fault_holds),
            (CounterMetricFamily, "herd_replica_fault_recoveries", "Holds that ended with a successful step (the "
             "experts came back)", stats.fault_recoveries),
            (GaugeMetricFamily, "herd_replica_fault_last_recovery_seconds", "How long the last recovered hold lasted, "
             "from the first failed step to the next successful one", stats.fault_last_recovery_s),
            (GaugeMetricFamily, "herd_replica_fault_held", "1 while the engine holds failed steps' requests (no step "
             "has succeeded since a failure)", float(stats.fault_held)))

    def _by_model(self, *specs: tuple[type[CounterMetricFamily] | type[GaugeMetricFamily], str, str, float],
                  ) -> Iterator[Any]:
        """One series per (kind, name, doc, value), labelled by this replica's model."""
        return (_series(kind, name, doc, [self.model], value) for kind, name, doc, value in specs)

    def _host_tier(self, stats: EngineStats) -> Iterator[Any]:
        """The host KV tier's series (all zero when it is off): slots held, hits, bytes moved each way."""
        model = [self.model]
        held = _series(GaugeMetricFamily, "herd_replica_host_kv_blocks_held", "KV blocks the host tier holds (both "
                       "layer groups)", model, stats.host_kv_blocks_held)
        capacity = _series(GaugeMetricFamily, "herd_replica_host_kv_blocks", "KV block slots of the host tier (0: "
                           "off)", model, stats.host_kv_blocks)
        hit_blocks = _series(CounterMetricFamily, "herd_replica_host_kv_hits_blocks", "KV blocks restored from the "
                             "host tier instead of recomputed", model, stats.host_kv_hit_blocks)
        hit_tokens = _series(CounterMetricFamily, "herd_replica_host_kv_hits_tokens", "Prompt tokens whose KV blocks "
                             "came (in part) from the host tier", model, stats.host_kv_hit_tokens)
        moved = CounterMetricFamily("herd_replica_host_kv_moved_bytes", "KV bytes copied between device and host "
                                    "(direction: to_host, to_device)", labels=["model", "direction"])
        moved.add_metric([self.model, "to_host"], stats.host_kv_saved_bytes)
        moved.add_metric([self.model, "to_device"], stats.host_kv_restored_bytes)
        yield from (held, capacity, hit_blocks, hit_tokens, moved)

    def describe(self) -> Iterator[Any]:
        return iter(())


def _series(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str, model: list[str],
            value: float) -> CounterMetricFamily | GaugeMetricFamily:
    """A series of one value labelled by model alone."""
    family = kind(name, doc, labels=["model"])
    family.add_metric(model, value)
    return family


__all__ = ["ReplicaMetrics"]
