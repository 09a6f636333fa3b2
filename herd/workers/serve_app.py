"""The Ray Serve application of one model: a ModelReplica deployment whose options come from its args (with
disaggregation: a prefill and a decode deployment of them behind herd.workers.pd_proxy's PDProxy).

`build_app` is what a Serve config file (and a KubeRay RayService's serveConfigV2) names through
herd.platform.replica_app:build_app; `replica_states` reads the application's replicas back from Serve.
"""

from __future__ import annotations

from typing import Any, cast

from ray import serve

from herd.workers.model_replica import ModelReplica, check_replica_args
from herd.workers.pd_proxy import disaggregated_app
from herd.workers.process_setup import ProcessSetup
from herd.workers.replica_config import BUNDLE_CPUS, ReplicaArgs

ROUTERS = {"prefix": "herd.workers.request_routers.PrefixAwareRouter",
           "round_robin": "herd.workers.request_routers.RoundRobinRouter"}
"""Serve request routers by the deployment's request_router (power_of_two is Serve's own default)."""


def build_app(args: dict[str, Any], *, process_setup: ProcessSetup | None = None) -> serve.Application:
    """The application of one model from its ReplicaArgs (as JSON): deployment options from args.deployment,
    one placement group per replica (the trunk's bundle, then one per shard process). ValueError for args no
    replica could start with (shards on the node's address without shard TLS), before anything is deployed."""
    config = ReplicaArgs.model_validate(args)
    check_replica_args(config)
    deployment = config.deployment

    def bundle(gpus: float) -> dict[str, float]:
        return {"CPU": BUNDLE_CPUS, **({"GPU": gpus} if deployment.gpus else {})}

    options: dict[str, Any] = {
        "name": config.name,
        "max_ongoing_requests": deployment.max_ongoing_requests or config.engine.max_num_seqs,
        "max_queued_requests": deployment.max_queued_requests,
        "placement_group_bundles": [bundle(config.trunks * deployment.trunk_gpus)]
        + [bundle(deployment.shard_gpus)] * config.shard_processes,
        "placement_group_strategy": deployment.placement_strategy,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
        "health_check_period_s": deployment.health_check_period_s,
        "ray_actor_options": {"num_cpus": 0},  # the replica's share is bundle 0
    }
    if deployment.request_router != "power_of_two":
        options["request_router_config"] = {"request_router_class": ROUTERS[deployment.request_router],
                                            "request_router_kwargs": {
                                                "imbalance_requests": deployment.prefix_imbalance_requests}}
    if deployment.autoscaling is not None:
        options["autoscaling_config"] = deployment.autoscaling.model_dump()
    else:
        options["num_replicas"] = deployment.num_replicas
    if config.disaggregation is not None:  # a prefill and a decode pool of these replicas, behind a proxy
        return disaggregated_app(config, options, process_setup)
    # @serve.deployment made the class a Deployment; mypy keeps a decorated class's own type.
    replica = cast(serve.Deployment, ModelReplica)
    return replica.options(**options).bind(config.model_dump(mode="json"), process_setup)


def replica_states(app_name: str) -> dict[str, int]:
    """Replicas of a Serve application by state (RUNNING, STARTING, STOPPING, ...), from the controller."""
    app = serve.status().applications.get(app_name)
    states: dict[str, int] = {}
    for deployment in app.deployments.values() if app is not None else ():
        for state, count in deployment.replica_states.items():
            name = getattr(state, "value", state)  # a ReplicaState enum; str() gives "ReplicaState.X"
            states[name] = states.get(name, 0) + count
    return states


__all__ = ["build_app", "replica_states"]
