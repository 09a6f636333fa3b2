"""The Helm chart's dev-profile pods, run from the image as Kubernetes and KubeRay would run them, short of a cluster
(opt-in: `make image-test`; needs buildah, podman, runc and debootstrap).

The chart is rendered with real Helm for values-dev.yaml, and everything the pods run is taken from the rendered
objects: the make-tiny init container's command, the Ray head's and worker's ray start (built from the chart's
rayStartParams and limits as KubeRay builds it, in `bash -lc`), the RayService's serveConfigV2 (deployed with
`serve deploy` from inside the head, as KubeRay's PUT to the dashboard does), the gateway's command and its herd.yaml
from the ConfigMap. Every container runs read-only, as uid/gid 1000 with every capability dropped (the pods'
securityContext), /tmp its own writable tmpfs (the pods' emptyDir). From the host, a tenant and a key through the
gateway's admin API, then /v1/models and a chat with that key.

Where this differs from a cluster, and why:
- One network for every pod (podman's host networking here): the ports that would collide are free ports chosen
  here: GCS, dashboard, Ray client, the dashboard agent and metrics export of both Ray nodes, Serve's HTTP and gRPC
  proxies (in serveConfigV2 the gRPC port is rewritten and `http_options.port` added: the chart leaves Serve on its
  default 8000), the gateway's three ports; and `serve_grpc_target` points at 127.0.0.1 instead of the Service.
  Both Ray nodes run a Serve proxy on the same ports: Serve binds them with SO_REUSEPORT, as the same uid.
- One make-tiny run whose directory every pod mounts (the chart runs the same command in each pod, checked here).
- No autoscaler sidecar and no control plane: both need the Kubernetes API.
- KubeRay's `ulimit -n 65536` fails here (containers/podman.conf sets no default ulimits, so the hard limit stays
  the host's) and bash goes on to `ray start`, as it would in a pod.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
import yaml

from bench.common import free_port
from tests.integration.image_fixtures import ROOT, build_image, podman  # noqa: F401 (build_image: the image fixture)

pytestmark = pytest.mark.image

CHART_DIR = ROOT / "helm" / "herd"
RELEASE, NAMESPACE = "herd", "llm"
UID = 1000


# --- the chart, rendered ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayNode:
    """A Ray container of the RayService: the chart gives no command, KubeRay builds `ray start` from these."""

    ray_start_params: dict[str, str]
    limits: dict[str, Any]
    env: dict[str, str]
    weights_mount: str


@dataclass(frozen=True)
class DevChart:
    serve_config: dict[str, Any]
    in_tree_autoscaling: bool
    head: RayNode
    worker: RayNode
    make_tiny: list[str]
    weights_mount: str
    gateway: list[str]
    gateway_env: dict[str, str]
    herd_yaml: dict[str, Any]
    config_mount: str
    state_mount: str


def _render_dev() -> list[dict[str, Any]]:
    """values-dev.yaml over values.yaml, rendered by the Helm SDK (as tests/unit/helm/conftest.py does)."""
    values = helm.values_from_yaml((CHART_DIR / "values-dev.yaml").read_text())
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [obj for template, text in sorted(manifests.items()) if not template.endswith("NOTES.txt")
            for obj in yaml.safe_load_all(text) if obj]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"the dev profile should render one {kind}, not {len(found)}"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _mount(container: dict[str, Any], volume: str) -> str:
    return next(str(m["mountPath"]) for m in container["volumeMounts"] if m["name"] == volume)


def _check_pod(pod: dict[str, Any], where: str) -> None:
    """The securityContext this test runs every container with is the chart's."""
    context = pod["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (UID, UID, UID), where
    for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        assert security["allowPrivilegeEscalation"] is False, where


def _ray_node(group: dict[str, Any], where: str) -> tuple[RayNode, list[str]]:
    pod = group["template"]
    _check_pod(pod, where)
    [container] = pod["spec"]["containers"]
    assert "command" not in container and "args" not in container, f"{where}: KubeRay builds the command"
    [init] = pod["spec"]["initContainers"]
    node = RayNode(ray_start_params={k: str(v) for k, v in group["rayStartParams"].items()},
                   limits=container["resources"]["limits"], env=_env(container),
                   weights_mount=_mount(container, "weights"))
    return node, [*init["command"], *init.get("args", [])]


def dev_chart() -> DevChart:
    objects = _render_dev()
    service = _one(objects, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    head, head_init = _ray_node(cluster["headGroupSpec"], "ray head")
    [worker_group] = cluster["workerGroupSpecs"]
    worker, worker_init = _ray_node(worker_group, "ray worker")
    gateway_pod = next(obj for obj in objects if obj["kind"] == "Deployment"
                       and obj["metadata"]["name"] == f"{RELEASE}-gateway")["spec"]["template"]
    _check_pod(gateway_pod, "gateway")
    [gateway] = gateway_pod["spec"]["containers"]
    [gateway_init] = gateway_pod["spec"]["initContainers"]
    init_mount = _mount(gateway_init, "weights")
    # Each pod makes the tiny model itself; this test makes it once for all of them, so they must agree.
    make_tiny = [*gateway_init["command"], *gateway_init.get("args", [])]
    assert head_init == worker_init == make_tiny
    assert head.weights_mount == worker.weights_mount == _mount(gateway, "weights") == init_mount
    configmap = _one(objects, "ConfigMap")
    return DevChart(
        serve_config=yaml.safe_load(service["spec"]["serveConfigV2"]),
        in_tree_autoscaling=bool(cluster.get("enableInTreeAutoscaling")),
        head=head, worker=worker, make_tiny=make_tiny, weights_mount=init_mount,
        gateway=[*gateway["command"], *gateway.get("args", [])], gateway_env=_env(gateway),
        herd_yaml=yaml.safe_load(configmap["data"]["herd.yaml"]),
        config_mount=_mount(gateway, "config"), state_mount=_mount(gateway, "state"))


# --- what KubeRay does with it ---------------------------------------------------------------------------------


def quantity(value: str | int) -> int:
    """A Kubernetes quantity as KubeRay reads a limit (Quantity.Value(): whole units, rounded up)."""
    text = str(value)
    for suffix, scale in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("k", 10**3), ("M", 10**6), ("G", 10**9)):
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * scale
    if text.endswith("m"):
        return -(-int(text[:-1]) // 1000)
    return int(text)


def kuberay_ray_start(node: RayNode, *, head: bool, params: dict[str, str]) -> str:
    """The Ray container's `bash -lc` argument as KubeRay's pod builder writes it when the chart gives no command:
    the rayStartParams (with this test's `params` over them), num-cpus and memory from the limits when not given,
    --block, and the file-descriptor limit first."""
    merged = {**node.ray_start_params, **params, "block": "true"}
    merged.setdefault("num-cpus", str(quantity(node.limits["cpu"])))
    merged.setdefault("memory", str(quantity(node.limits["memory"])))
    flags = " ".join(f"--{key}" if value == "true" else f"--{key}={value}" for key, value in sorted(merged.items()))
    return f"ulimit -n 65536; ray start {'--head ' if head else ''}{flags}"


def shm_size(node: RayNode) -> str:
    """KubeRay gives a Ray container a memory-backed /dev/shm (the object store) as large as its memory limit."""
    return str(quantity(node.limits["memory"]))


def raylet_probe(agent_port: int) -> str:
    """KubeRay's readiness probe of a Ray container (it needs wget in the image)."""
    return f"wget -T 2 -q -O- http://localhost:{agent_port}/api/local_raylet_healthz | grep success"


def gcs_probe(dashboard_port: int) -> str:
    return f"wget -T 2 -q -O- http://localhost:{dashboard_port}/api/gcs_healthz | grep success"


# --- the pods, in podman ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    gcs: int = 0
    dashboard: int = 0
    client: int = 0
    head_agent: int = 0
    head_metrics: int = 0
    worker_agent: int = 0
    worker_metrics: int = 0
    serve_http: int = 0
    serve_grpc: int = 0
    http: int = 0
    grpc: int = 0
    ops: int = 0

    @classmethod
    def free(cls) -> Ports:
        chosen: list[int] = []
        while len(chosen) < len(cls.__dataclass_fields__):
            port = free_port()
            if port not in chosen:
                chosen.append(port)
        return cls(*chosen)


def run_options(image_env: dict[str, str], *volumes: str) -> list[str]:
    """`podman run` as the chart's securityContext and the pods' /tmp emptyDir say, on the host's network."""
    options = ["--network", "host", "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges"]
    for name, value in image_env.items():
        options += ["--env", f"{name}={value}"]
    for volume in volumes:
        options += ["--volume", volume]
    return options


def logs(name: str) -> str:
    out = podman("logs", name, check=False)
    return f"--- {name} ---\n{(out.stdout + out.stderr)[-3000:]}"


def running(name: str) -> bool:
    return podman("inspect", name, "--format", "{{.State.Running}}", check=False).stdout.strip() == "true"


def wait_for(what: str, ready: Callable[[], bool], watched: list[str], timeout_s: float) -> None:
    """Poll `ready` each second until it holds; fail early, with its logs, when a watched container stops."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        stopped = [name for name in watched if not running(name)]
        if stopped:
            pytest.fail(f"{what}: {', '.join(stopped)} stopped\n" + "\n".join(logs(n) for n in watched))
        time.sleep(1)
    pytest.fail(f"{what}: not in {timeout_s:.0f} s\n" + "\n".join(logs(n) for n in watched))


def probe(name: str, script: str) -> bool:
    return podman("exec", name, "bash", "-c", script, check=False, timeout_s=30).returncode == 0


def serve_status(head: str, dashboard_port: int) -> dict[str, Any]:
    out = podman("exec", head, "bash", "-lc", f"serve status --address http://127.0.0.1:{dashboard_port}",
                 check=False, timeout_s=60)
    return (yaml.safe_load(out.stdout) or {}) if out.returncode == 0 else {}


@dataclass(frozen=True)
class Gateway:
    http: str
    ops: str
    state: Path
    model: str


class Pods:
    """The dev profile's Ray head, Ray worker and gateway pods as podman containers (one container per pod)."""

    def __init__(self, image: str, chart: DevChart, work: Path) -> None:
        self.image, self.chart, self.ports = image, chart, Ports.free()
        self.weights, self.state, self.config = work / "weights", work / "state", work / "herd.yaml"
        for owned in (self.weights, self.state):
            owned.mkdir()
            os.chown(owned, UID, UID)  # the pods' fsGroup
        self.prefix = f"herd-chart-test-{self.ports.gcs}"
        self.head, self.worker, self.gateway = (f"{self.prefix}-{pod}" for pod in ("head", "worker", "gateway"))

    def make_weights(self) -> None:
        """The init container: the tiny model into the weights volume."""
        chart = self.chart
        made = podman("run", "--rm", *run_options(chart.gateway_env, f"{self.weights}:{chart.weights_mount}"),
                      self.image, *chart.make_tiny, check=False, timeout_s=300)
        assert made.returncode == 0, f"{chart.make_tiny} failed:\n{made.stdout[-3000:]}{made.stderr[-3000:]}"
        [model_dir] = self.weights.iterdir()
        assert (model_dir / "config.json").stat().st_uid == UID

    def _start_ray(self, name: str, node: RayNode, env: dict[str, str], ray_start: str) -> None:
        podman("run", "--detach", "--name", name, "--shm-size", shm_size(node),
               *run_options(env, f"{self.weights}:{node.weights_mount}:ro"),
               self.image, "/bin/bash", "-lc", "--", ray_start)

    def start_head(self) -> None:
        ports, node = self.ports, self.chart.head
        self._start_ray(self.head, node, {
            **node.env, "RAY_IP": "127.0.0.1", "RAY_PORT": str(ports.gcs), "RAY_ADDRESS": f"127.0.0.1:{ports.gcs}",
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1"}, kuberay_ray_start(node, head=True, params={
                "port": str(ports.gcs), "dashboard-port": str(ports.dashboard),
                "ray-client-server-port": str(ports.client), "dashboard-agent-listen-port": str(ports.head_agent),
                "metrics-export-port": str(ports.head_metrics),
                **({"no-monitor": "true"} if self.chart.in_tree_autoscaling else {})}))
        wait_for("the Ray head's readiness probe",
                 lambda: probe(self.head, f"{raylet_probe(ports.head_agent)} && {gcs_probe(ports.dashboard)}"),
                 [self.head], timeout_s=120)

    def start_worker(self) -> None:
        ports, node = self.ports, self.chart.worker
        self._start_ray(self.worker, node, {
            **node.env, "RAY_IP": "127.0.0.1", "RAY_PORT": str(ports.gcs), "RAY_USAGE_STATS_KUBERAY_IN_USE": "1"},
            kuberay_ray_start(node, head=False, params={
                "address": f"127.0.0.1:{ports.gcs}", "dashboard-agent-listen-port": str(ports.worker_agent),
                "metrics-export-port": str(ports.worker_metrics)}))
        wait_for("the Ray worker's readiness probe", lambda: probe(self.worker, raylet_probe(ports.worker_agent)),
                 [self.head, self.worker], timeout_s=120)

    def deploy_serve(self) -> None:
        """KubeRay PUTs serveConfigV2 to the head's dashboard; `serve deploy` does the same from inside the head."""
        ports, config = self.ports, self.chart.serve_config
        config["grpc_options"]["port"] = ports.serve_grpc
        config["http_options"] = {"port": ports.serve_http}
        [app] = config["applications"]
        deploy = podman("exec", "--interactive", self.head, "bash", "-lc",
                        "cat > /tmp/serve-config.yaml && serve deploy /tmp/serve-config.yaml "
                        f"--address http://127.0.0.1:{ports.dashboard}",
                        input_text=yaml.safe_dump(config), check=False, timeout_s=120)
        assert deploy.returncode == 0, f"serve deploy failed:\n{deploy.stdout[-3000:]}{deploy.stderr[-3000:]}"

        def app_running() -> bool:
            status = serve_status(self.head, ports.dashboard).get("applications", {}).get(app["name"], {})
            if status.get("status") == "DEPLOY_FAILED":
                pytest.fail(f"the Serve application failed to deploy: {status}\n{logs(self.head)}\n{logs(self.worker)}")
            return status.get("status") == "RUNNING"

        wait_for(f"Serve application {app['name']} RUNNING", app_running, [self.head, self.worker], timeout_s=240)

    def start_gateway(self) -> Gateway:
        """The gateway, on the ConfigMap's herd.yaml with this host's ports and Serve target."""
        chart, ports = self.chart, self.ports
        herd_yaml = chart.herd_yaml
        herd_yaml.update(http_port=ports.http, grpc_port=ports.grpc, ops_port=ports.ops)
        [model] = herd_yaml["models"]
        model["serve_grpc_target"] = f"127.0.0.1:{ports.serve_grpc}"
        self.config.write_text(yaml.safe_dump(herd_yaml))
        self.config.chmod(0o644)
        podman("run", "--detach", "--name", self.gateway,
               *run_options(chart.gateway_env, f"{self.config}:{chart.config_mount}:ro",
                            f"{self.state}:{chart.state_mount}", f"{self.weights}:{chart.weights_mount}:ro"),
               self.image, *chart.gateway)
        http = f"http://127.0.0.1:{ports.http}"

        def ready() -> bool:
            try:
                return httpx.get(f"{http}/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the gateway's /health/ready", ready, [self.head, self.worker, self.gateway], timeout_s=120)
        return Gateway(http=http, ops=f"http://127.0.0.1:{ports.ops}", state=self.state, model=model["name"])

    def remove(self) -> None:
        """ray stop in the Ray containers, then every container removed; none may be left."""
        for name in (self.gateway, self.worker, self.head):
            if name != self.gateway and running(name):
                podman("exec", name, "bash", "-lc", "ray stop --force", check=False, timeout_s=60)
            podman("rm", "--force", "--time", "5", name, check=False, timeout_s=120)
        left = podman("ps", "--all", "--filter", f"name={self.prefix}", "--format", "{{.Names}}").stdout.split()
        assert not left, f"containers left behind: {left}"


@pytest.fixture(scope="module")
def chart() -> DevChart:
    return dev_chart()


@pytest.fixture(scope="module")
def gateway(image: str, chart: DevChart, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The dev profile's Ray head and worker, its Serve application and its gateway, each container started from
    the image with the command the chart (and KubeRay) gives it; all removed afterwards, also on a failure."""
    pods = Pods(image, chart, tmp_path_factory.mktemp("chart-pods"))
    try:
        pods.make_weights()
        pods.start_head()
        pods.start_worker()
        pods.deploy_serve()
        yield pods.start_gateway()
    finally:
        pods.remove()


def test_the_dev_charts_pods_serve_a_tenant_from_the_image(gateway: Gateway) -> None:
    token = (gateway.state / "admin-token").read_text().strip()
    admin = {"Authorization": f"Bearer {token}"}
    tenant = httpx.post(f"{gateway.ops}/admin/v1/tenants", headers=admin, timeout=10,
                        json={"id": "chart-test", "allowed_models": [gateway.model]})
    assert tenant.status_code == 201, tenant.text
    issued = httpx.post(f"{gateway.ops}/admin/v1/tenants/chart-test/keys", headers=admin, timeout=10,
                        json={"name": "image-chart-test"})
    assert issued.status_code == 201, issued.text
    key = {"Authorization": f"Bearer {issued.json()['key']}"}

    models = httpx.get(f"{gateway.http}/v1/models", headers=key, timeout=10)
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == [gateway.model]

    reply = httpx.post(f"{gateway.http}/v1/chat/completions", headers=key, timeout=120, json={
        "model": gateway.model, "messages": [{"role": "user", "content": "Hello from outside the cluster"}],
        "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Without the key the gateway refuses: auth is on in the dev profile's herd.yaml.
    assert httpx.get(f"{gateway.http}/v1/models", timeout=10).status_code == 401
