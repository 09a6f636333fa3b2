"""How the control plane changes the replica count of one deployment of a model's Serve application (the model's
own, or a pool's of a disaggregated model): one interface, Ray Serve or Kubernetes.

On Kubernetes the lever is the model's Serve application inside its RayService's serveConfigV2: a
`deployments: [{name, num_replicas}]` override of the deployment (autoscaling bounds [0, 1] for zero) that
KubeRay applies to the running cluster in place (GPU worker pods follow through KubeRay's in-tree autoscaler).
workerGroupSpecs[].replicas is never touched: KubeRay leaves it out of its update hash and the Ray
autoscaler owns it. Locally (herd serve) it is Serve's external-scaler REST call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import yaml

from herd.workers.replica_config import POOLS, pool_deployment
from herd.workers.serve_details import replica_counts, target_replicas

if TYPE_CHECKING:
    from kubernetes import client as k8s


@dataclass(frozen=True)
class ReplicaStatus:
    target: int
    ready: int
    starting: int


class Actuator(Protocol):
    """`model` names the Serve application, `deployment` the deployment in it (None: the one named as the model)."""

    def status(self, model: str, deployment: str | None = None) -> ReplicaStatus: ...

    def scale(self, model: str, replicas: int, deployment: str | None = None) -> None: ...


class ServeActuator:
    """A Ray Serve cluster through its dashboard's REST API (herd serve). Serve's external-scaler call sets
    a deployment's target in place: no redeploy, no restart of running replicas, zero included. The
    application must be deployed with `external_scaler_enabled` (herd serve does, with the control plane on).
    """

    def __init__(self, dashboard_url: str, *, timeout_s: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        base = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        self.client = httpx.Client(base_url=base, timeout=timeout_s, transport=transport, headers=_ray_auth())

    def status(self, model: str, deployment: str | None = None) -> ReplicaStatus:
        deployment = deployment or model
        reply = self.client.get("/api/serve/applications/")
        reply.raise_for_status()
        details = reply.json()
        target = target_replicas(details, model, deployment)
        if target is None:
            raise RuntimeError(f"Ray Serve has no deployment {deployment!r} in application {model!r}")
        counts = replica_counts(details, model, deployment)
        return ReplicaStatus(target=target, ready=counts.get("RUNNING", 0),
                             starting=counts.get("STARTING", 0) + counts.get("RECOVERING", 0))

    def scale(self, model: str, replicas: int, deployment: str | None = None) -> None:
        """Returns once Serve has the new target; it brings the replicas there asynchronously."""
        deployment = deployment or model
        reply = self.client.post(f"/api/v1/applications/{model}/deployments/{deployment}/scale",
                                 json={"target_num_replicas": replicas})
        if reply.status_code != 200:
            raise RuntimeError(f"Ray Serve refused to scale {model}/{deployment} to {replicas}: "
                               f"{reply.status_code} {reply.text}")


def _ray_auth() -> dict[str, str]:
    """The dashboard's Authorization header when the Ray cluster uses token authentication (as Ray's own
    CLI sends it), else none."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # a Ray without token authentication
        return {}
    return dict(get_auth_headers_if_auth_enabled({}))


# Serve's config takes no `num_replicas: 0`; zero is autoscaling bounds of [0, 1] that drop to zero at once
# (a request reaching Serve while there brings one replica back by itself; the gateway holds its requests
# for the control plane instead).
_AT_ZERO = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "downscale_delay_s": 0.0,
            "downscale_to_zero_delay_s": 0.0}


def with_replicas(serve_config_yaml: str, application: str, replicas: int, deployment: str | None = None) -> str:
    """The serveConfigV2 text with `application`'s `deployment` (None: the one named as the application) pinned to
    `replicas` (pure); the other deployments' overrides stay."""
    deployment = deployment or application
    config = yaml.safe_load(serve_config_yaml)
    for app in config.get("applications", []):
        if app.get("name") == application:
            overrides = [d for d in app.get("deployments", []) if d.get("name") != deployment]
            pinned = {"num_replicas": replicas} if replicas > 0 else {"autoscaling_config": dict(_AT_ZERO)}
            app["deployments"] = [*overrides, {"name": deployment, **pinned}]
            break
    else:
        raise ValueError(f"serveConfigV2 has no application {application!r}")
    return yaml.safe_dump(config, sort_keys=False)


def replicas_in(serve_config_yaml: str, application: str, deployment: str | None = None) -> int | None:
    """The replica count `with_replicas` pinned for `deployment` (None: the one named as the application), else
    the one the application's args start it with (a pool's from args.disaggregation)."""
    deployment = deployment or application
    config = yaml.safe_load(serve_config_yaml)
    for app in config.get("applications", []):
        if app.get("name") == application:
            for override in app.get("deployments", []):
                if override.get("name") == deployment and "num_replicas" in override:
                    return int(override["num_replicas"])
                if override.get("name") == deployment and "autoscaling_config" in override:
                    return 0
            return _started(app.get("args", {}), application, deployment)
    return None


def _started(args: dict[str, Any], application: str, deployment: str) -> int | None:
    """The replicas a deployment of the application starts with, by its args (ReplicaArgs as JSON)."""
    for pool in POOLS:
        if deployment == pool_deployment(application, pool):
            pd = args.get("disaggregation") or {}
            return int(pd.get(f"{pool}_replicas", 1))
    started: int | None = args.get("deployment", {}).get("num_replicas")
    return started


class KubernetesActuator:
    """RayServices through the official client: one merge patch of spec.serveConfigV2 per change."""

    GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"

    def __init__(self, api: k8s.CustomObjectsApi, namespace: str, rayservices: dict[str, str]) -> None:
        self.api = api
        self.namespace = namespace
        self.rayservices = rayservices  # model -> RayService name

    def _get(self, model: str) -> dict[str, Any]:
        obj = self.api.get_namespaced_custom_object(self.GROUP, self.VERSION, self.namespace, self.PLURAL,
                                                    self.rayservices[model])
        if not isinstance(obj, dict):  # the client types a custom object as `object`
            raise TypeError(f"RayService {self.rayservices[model]!r} came back as {type(obj).__name__}, not an object")
        return obj

    def status(self, model: str, deployment: str | None = None) -> ReplicaStatus:
        obj = self._get(model)
        target = replicas_in(obj["spec"]["serveConfigV2"], model, deployment) or 0
        apps = (obj.get("status") or {}).get("activeServiceStatus", {}).get("applicationStatuses", {})
        running = apps.get(model, {}).get("status") == "RUNNING"
        # KubeRay reports application health, not replica counts: a running application is taken as
        # serving its target, anything else as still starting it.
        return ReplicaStatus(target=target, ready=target if running else 0, starting=0 if running else target)

    def scale(self, model: str, replicas: int, deployment: str | None = None) -> None:
        obj = self._get(model)
        patch = {"spec": {"serveConfigV2": with_replicas(obj["spec"]["serveConfigV2"], model, replicas, deployment)}}
        self.api.patch_namespaced_custom_object(self.GROUP, self.VERSION, self.namespace, self.PLURAL,
                                                self.rayservices[model], patch)
