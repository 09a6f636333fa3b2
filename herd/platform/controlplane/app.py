"""Running the control plane: in `herd serve` (Ray Serve actuator, the gateway in process) and as
`herd controlplane` on Kubernetes (RayService actuator, gateways over HTTP, Lease election)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from herd.platform.controlplane.actuators import Actuator, KubernetesActuator, ServeActuator
from herd.platform.controlplane.leader import LeaseElector
from herd.platform.controlplane.loop import ControlPlane
from herd.platform.controlplane.metrics import GatewayLoadSource, HttpLoadSource, MetricsSource
from herd.platform.controlplane.policy import Fleet, ModelPolicy
from herd.platform.controlplane.units import Unit, colocated, pool
from herd.platform.settings import HerdSettings

if TYPE_CHECKING:
    from herd.platform.gateway.core import Gateway

log = logging.getLogger("herd.controlplane")


def units(settings: HerdSettings) -> dict[str, tuple[Unit, ModelPolicy]]:
    """What the control plane scales, by unit name, with its policy: each colocated model within its `autoscale`,
    each pool of a disaggregated model within its disaggregation.<pool>_autoscale (the prefill pool on TTFT alone
    of the latencies, the decode pool on ITL and KV use). The GPUs a replica takes come from its deployment."""
    out: dict[str, tuple[Unit, ModelPolicy]] = {}
    for model in settings.models:
        gpus = model.gpus_per_replica
        pd = model.disaggregation
        if pd is None:
            # AutoscaleSettings' fields are ModelPolicy's.
            out[model.name] = (colocated(model.name), ModelPolicy(**model.autoscale.model_dump(),
                                                                  gpus_per_replica=gpus))
            continue
        prefill, decode = pool(model.name, "prefill"), pool(model.name, "decode")
        out[prefill.name] = (prefill, ModelPolicy(**pd.prefill_autoscale.model_dump(), gpus_per_replica=gpus))
        out[decode.name] = (decode, ModelPolicy(**pd.decode_autoscale.model_dump(), ttft_slo_s=None,
                                                gpus_per_replica=gpus))
    return out


def fleet(settings: HerdSettings) -> Fleet:
    return Fleet(gpu_pool=settings.controlplane.gpu_pool,
                 policies={name: policy for name, (_, policy) in units(settings).items()})


def local_control_plane(settings: HerdSettings, gateway: Gateway, dashboard_url: str) -> ControlPlane:
    """herd serve's: reads the gateway in this process (and the KV use of disaggregated models' decode replicas),
    scales the Serve deployments through the dashboard."""
    kv_models = [m.name for m in settings.models if m.disaggregation is not None]
    return _plane(settings, GatewayLoadSource(gateway, kv_models), ServeActuator(dashboard_url), leader=None)


def kubernetes_control_plane(settings: HerdSettings) -> ControlPlane:
    from herd.platform.controlplane import kube

    api = kube.api_client(settings.controlplane.kubeconfig)
    cp = settings.controlplane
    missing = [m.name for m in settings.models if m.name not in cp.rayservices]
    if missing:
        raise ValueError(f"controlplane.rayservices names no RayService for models {missing}")
    if not cp.gateway_urls:
        raise ValueError("controlplane.gateway_urls is empty: the control plane reads load from the gateways")
    identity = os.environ.get("POD_NAME") or socket.gethostname()
    elector = LeaseElector(kube.leases(api), cp.namespace, cp.lease_name, identity)
    actuator = KubernetesActuator(kube.custom_objects(api), cp.namespace, cp.rayservices)
    source = HttpLoadSource(cp.gateway_urls, resolve=cp.resolve_gateways)
    return _plane(settings, source, actuator, leader=elector.try_lead)


def _plane(settings: HerdSettings, source: MetricsSource, actuator: Actuator,
           leader: Callable[[], bool] | None) -> ControlPlane:
    scaled = units(settings)
    return ControlPlane(source, actuator, fleet(settings), units={name: unit for name, (unit, _) in scaled.items()},
                        interval_s=settings.controlplane.interval_s, leader=leader)


async def run_kubernetes(settings: HerdSettings) -> None:
    """herd controlplane: rounds until SIGTERM, Prometheus metrics on controlplane.metrics_port."""
    from prometheus_client import start_http_server

    plane = kubernetes_control_plane(settings)
    start_http_server(settings.controlplane.metrics_port, registry=plane.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("control plane for %s every %gs", list(plane.fleet.policies), plane.interval_s)
    await plane.run(stop)
