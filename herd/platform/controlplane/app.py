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
from herd.platform.settings import HerdSettings

if TYPE_CHECKING:
    from herd.platform.gateway.core import Gateway

log = logging.getLogger("herd.controlplane")


def fleet(settings: HerdSettings) -> Fleet:
    policies = {}
    for model in settings.models:
        # AutoscaleSettings' fields are ModelPolicy's; the GPUs a replica takes come from its deployment.
        policies[model.name] = ModelPolicy(**model.autoscale.model_dump(), gpus_per_replica=model.gpus_per_replica)
    return Fleet(gpu_pool=settings.controlplane.gpu_pool, policies=policies)


def local_control_plane(settings: HerdSettings, gateway: Gateway, dashboard_url: str) -> ControlPlane:
    """herd serve's: reads the gateway in this process, scales the Serve applications through the dashboard."""
    return _plane(settings, GatewayLoadSource(gateway), ServeActuator(dashboard_url), leader=None)


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
    return ControlPlane(source, actuator, fleet(settings), interval_s=settings.controlplane.interval_s, leader=leader)


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
