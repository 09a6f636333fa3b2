"""How the control plane changes a model's replica count: one interface, Ray Serve or Kubernetes.

On Kubernetes the lever is the model's Serve application inside its RayService's serveConfigV2: a
`deployments: [{name, num_replicas}]` override that KubeRay applies to the running cluster in place
(GPU worker pods follow through KubeRay's in-tree autoscaler). workerGroupSpecs[].replicas is never
touched: KubeRay leaves it out of its update hash and the Ray autoscaler owns it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import yaml


@dataclass(frozen=True)
class ReplicaStatus:
    target: int
    ready: int
    starting: int


class Actuator(Protocol):
    def status(self, model: str) -> ReplicaStatus: ...

    def scale(self, model: str, replicas: int) -> None: ...


class ServeActuator:
    """A local Ray Serve (herd serve): redeploys the model's application with a new replica count,
    which Serve applies in place (only num_replicas changes)."""

    def __init__(self, app_args: dict[str, dict[str, Any]]) -> None:
        self.app_args = app_args

    def status(self, model: str) -> ReplicaStatus:
        from ray import serve

        app = serve.status().applications.get(model)
        states: dict[str, int] = {}
        if app is not None:
            for deployment in app.deployments.values():
                for state, count in deployment.replica_states.items():
                    states[str(state)] = states.get(str(state), 0) + count
        target = self.app_args[model]["deployment"].get("num_replicas", 1)
        return ReplicaStatus(target=target, ready=states.get("RUNNING", 0), starting=states.get("STARTING", 0))

    def scale(self, model: str, replicas: int) -> None:
        from ray import serve

        from herd.workers.serve_app import build_app

        args = copy.deepcopy(self.app_args[model])
        args["deployment"].pop("autoscaling", None)
        args["deployment"]["num_replicas"] = replicas
        serve.run(build_app(args), name=model, route_prefix=None)
        self.app_args[model] = args


def with_replicas(serve_config_yaml: str, application: str, replicas: int) -> str:
    """The serveConfigV2 text with `application`'s deployment pinned to `replicas` (pure)."""
    config = yaml.safe_load(serve_config_yaml)
    for app in config.get("applications", []):
        if app.get("name") == application:
            overrides = [d for d in app.get("deployments", []) if d.get("name") != application]
            app["deployments"] = [*overrides, {"name": application, "num_replicas": replicas}]
            break
    else:
        raise ValueError(f"serveConfigV2 has no application {application!r}")
    return yaml.safe_dump(config, sort_keys=False)


def replicas_in(serve_config_yaml: str, application: str) -> int | None:
    config = yaml.safe_load(serve_config_yaml)
    for app in config.get("applications", []):
        if app.get("name") == application:
            for deployment in app.get("deployments", []):
                if deployment.get("name") == application and "num_replicas" in deployment:
                    return int(deployment["num_replicas"])
            return app.get("args", {}).get("deployment", {}).get("num_replicas")
    return None


class KubernetesActuator:
    """RayServices through the official client: one merge patch of spec.serveConfigV2 per change."""

    GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"

    def __init__(self, api: Any, namespace: str, rayservices: dict[str, str]) -> None:
        self.api = api  # kubernetes.client.CustomObjectsApi
        self.namespace = namespace
        self.rayservices = rayservices  # model -> RayService name

    def _get(self, model: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(self.GROUP, self.VERSION, self.namespace, self.PLURAL,
                                                     self.rayservices[model])

    def status(self, model: str) -> ReplicaStatus:
        obj = self._get(model)
        target = replicas_in(obj["spec"]["serveConfigV2"], model) or 0
        apps = (obj.get("status") or {}).get("activeServiceStatus", {}).get("applicationStatuses", {})
        running = apps.get(model, {}).get("status") == "RUNNING"
        # KubeRay reports application health, not replica counts: a running application is taken as
        # serving its target, anything else as still starting it.
        return ReplicaStatus(target=target, ready=target if running else 0, starting=0 if running else target)

    def scale(self, model: str, replicas: int) -> None:
        obj = self._get(model)
        patch = {"spec": {"serveConfigV2": with_replicas(obj["spec"]["serveConfigV2"], model, replicas)}}
        self.api.patch_namespaced_custom_object(self.GROUP, self.VERSION, self.namespace, self.PLURAL,
                                                self.rayservices[model], patch)
