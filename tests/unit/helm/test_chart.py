"""The Helm chart, rendered by real Helm (the Go SDK, offline) for every values profile and checked the way a
cluster would check it: Helm's lint, Kubernetes' OpenAPI schemas for the built-in kinds, KubeRay's CRD for the
RayServices, herd's own settings loader for the ConfigMap, and `herd serve --print-config` for serveConfigV2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.kuberay_crd import KUBERAY_DIR, crd_available, validate_rayservice
from tests.unit.helm.conftest import CHART_DIR, NAMESPACE, PROFILES, RELEASE, Rendered, deep_merge, profile_values

KUBE_VERSION = "1.31.0"
"""Kubernetes the built-in objects are validated against (kubernetes-validate ships its OpenAPI schemas)."""

CUSTOM_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}
"""Kinds kubernetes-validate has no schema for: the RayServices go to KubeRay's CRD instead."""

MODELS = {"defaults": {"scout"}, "scout": {"scout"}, "scout-mn": {"scout"}, "maverick": {"maverick"}, "dev": {"scout"}}
"""The models each profile serves."""

GPU_PROFILES = ["defaults", "scout", "scout-mn", "maverick"]
FULLNAME = RELEASE  # the release name already contains the chart's name
SETTINGS_PATH = "/etc/herd/herd.yaml"

profiles = pytest.mark.parametrize("profile", list(PROFILES))
needs_crd = pytest.mark.skipif(not crd_available(), reason=f"KubeRay's CRDs are not in {KUBERAY_DIR}")


# ---------------------------------------------------------------------------------------------------- helpers


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and the In / DoesNotExist expressions the chart uses)."""
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return matches(selector.get("matchLabels", {}), labels)


def containers(pod: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec["containers"], *(spec.get("initContainers", []) if init else [])]


def serve_config(rs: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def app_args(rs: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve_config(rs)["applications"]
    return app["args"]


def worker_groups(rs: dict[str, Any]) -> list[dict[str, Any]]:
    return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def cpus(quantity: Any) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def settings_text(rendered: Rendered) -> str:
    return rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["herd.yaml"]


def load_settings(text: str, tmp_path: Path):
    from herd.platform.settings import HerdSettings

    path = tmp_path / "herd.yaml"
    path.write_text(text)
    return HerdSettings.load(path)


# ------------------------------------------------------------------------------------------- Helm and schemas


@profiles
def test_chart_lints_clean_with_real_helm(profile: str) -> None:
    report = helm.lint(CHART_DIR, profile_values(profile), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@profiles
def test_builtin_objects_validate_against_kubernetes(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    checked = set()
    for template, obj in rendered_profiles[profile].objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        where = f"{template}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {'.'.join(map(str, err.absolute_path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            pytest.fail(f"{where}: not a Kubernetes {KUBE_VERSION} kind: {err.message}")
        assert len(obj["metadata"]["name"]) <= 63, where
        checked.add(obj["kind"])
    expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"}
    if profile != "dev":
        expected |= {"HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim"}
    assert checked == expected


@needs_crd
@profiles
def test_rayservices_validate_against_kuberay_crd(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    rayservices = rendered_profiles[profile].kind("RayService")
    assert rayservices
    for rs in rayservices:
        validate_rayservice(rs)


BAD_VALUES = {
    "unknown top-level key": ({"replicaCount": 3}, ["replicaCount", "not allowed"]),
    "unknown key under a model": ({"models": {"scout": {"replicas": 2}}}, ["/models/scout", "replicas"]),
    "unknown key under a model's engine": ({"models": {"scout": {"engine": {"kv_cache_gb": 1}}}},
                                           ["/models/scout/engine", "kv_cache_gb"]),
    "wrong type for shards": ({"models": {"scout": {"shards": "two"}}}, ["/models/scout/shards", "integer"]),
    "negative max_replicas": ({"models": {"scout": {"autoscale": {"max_replicas": -1}}}},
                              ["/models/scout/autoscale/max_replicas", "minimum"]),
    "negative Serve max_replicas": (
        {"controlplane": {"enabled": False},
         "models": {"scout": {"deployment": {"autoscaling": {"min_replicas": 0, "max_replicas": -2,
                                                             "target_ongoing_requests": 8}}}}},
        ["/models/scout/deployment/autoscaling/max_replicas", "minimum"]),
    "bad transport": ({"models": {"scout": {"transport": "nccl"}}}, ["/models/scout/transport", "grpc"]),
    "model name too long": ({"models": {"a-very-long-model-name-x": {"path": "x"}}},
                            ["a-very-long-model-name-x", "maxLength"]),
    "model name invalid": ({"models": {"Scout_4": {"path": "x"}}}, ["Scout_4", "pattern"]),
    "unknown key under modelDefaults": ({"modelDefaults": {"worker": {"gpus": 8}}}, ["/modelDefaults/worker", "gpus"]),
    "port out of range": ({"gateway": {"grpcPort": 70000}}, ["/gateway/grpcPort", "maximum"]),
    "bad dtype": ({"models": {"scout": {"engine": {"dtype": "fp8"}}}}, ["/models/scout/engine/dtype", "bfloat16"]),
    "node selector with a number": ({"gateway": {"nodeSelector": {"pool": 3}}}, ["/gateway/nodeSelector/pool"]),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values_naming_the_key(render, case: str) -> None:
    values, expected = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    message = str(caught.value)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in {message!r}"


def test_pass_through_blocks_accept_any_kubernetes_content(render) -> None:
    affinity = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchExpressions": [
                                               {"key": "app", "operator": "In", "values": ["x"]}]}}}]}}
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoExecute",
                    "tolerationSeconds": 30}]
    node_selector = {"topology.kubernetes.io/zone": "eu-west-1a", "example.com/pool": "inference"}
    resources = {"requests": {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "2Gi"},
                 "limits": {"cpu": 2, "memory": "2Gi", "example.com/fpga": 1}}
    block = {"affinity": affinity, "tolerations": tolerations, "nodeSelector": node_selector}
    worker = {**block, "resources": {"limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 4,
                                                "rdma/hca": 1}}}
    values = {"gateway": {**block, "resources": resources}, "controlplane": {**block, "resources": resources},
              "models": {"scout": {"head": {**block, "resources": resources}, "worker": worker}}}
    rendered = render(values)
    pods = dict(rendered.pod_templates())
    for where in ("Deployment/herd-gateway", "Deployment/herd-controlplane", "RayService/herd-scout/head",
                  "RayService/herd-scout/gpu"):
        spec = pods[where]["spec"]
        assert (spec["affinity"], spec["tolerations"], spec["nodeSelector"]) == (affinity, tolerations, node_selector)
    assert pods["Deployment/herd-gateway"]["spec"]["containers"][0]["resources"] == resources
    assert pods["RayService/herd-scout/gpu"]["spec"]["containers"][0]["resources"]["limits"]["rdma/hca"] == 1
    for _, obj in rendered.objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    if crd_available():
        validate_rayservice(rendered.one("RayService", "herd-scout"))


GUARDS = {
    "replica larger than a worker pod": (
        {"models": {"maverick": {"worker": {"resources": {"limits": {"nvidia.com/gpu": 4},
                                                          "requests": {"nvidia.com/gpu": 4}}}}}},
        "maverick", ["models.maverick", "needs 8 GPUs", "has 4"]),
    "M:N trunks larger than a worker pod": (
        {"models": {"scout": {"trunks": 2, "transport": "collective"}}},
        "scout", ["models.scout", "needs 5 GPUs", "2 trunks x 1", "has 4"]),
    "replica needs more CPUs than a worker pod": (
        {"models": {"scout": {"worker": {"resources": {"limits": {"cpu": "1500m"}}}}}},
        "dev", ["models.scout", "needs 3 CPUs", "1.5"]),
    "Serve autoscaling and the control plane together": (
        {"models": {"scout": {"deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 2,
                                                             "target_ongoing_requests": 8}}}}},
        "defaults", ["models.scout.deployment.autoscaling", "controlplane.enabled"]),
    "SQLite with several gateways": ({"tenancy": {"database": {"existingSecret": ""}}}, "defaults",
                                     ["tenancy.database.existingSecret", "gateway.replicas: 1"]),
    "no model enabled": ({"models": {"scout": {"enabled": False}}}, "defaults", ["no model is enabled"]),
    "worker replicas outside their bounds": ({"models": {"scout": {"worker": {"replicas": 9}}}}, "defaults",
                                             ["models.scout.worker", "replicas (9)"]),
    "tiny weights with a real path": ({"models": {"scout": {"path": "Llama-4-Scout"}}}, "dev",
                                      ["models.scout.path", "tiny preset"]),
    "control-plane bounds reversed": ({"models": {"scout": {"autoscale": {"min_replicas": 3, "max_replicas": 2}}}},
                                      "defaults", ["models.scout.autoscale", "max_replicas (2)"]),
}


@pytest.mark.parametrize("case", list(GUARDS))
def test_templates_refuse_settings_that_cannot_run(render, case: str) -> None:
    values, profile, expected = GUARDS[case]
    with pytest.raises(helm.HelmError) as caught:
        render(deep_merge(profile_values(profile), values))
    for text in expected:
        assert text in str(caught.value), f"{case}: {text!r} not in {caught.value}"


def _schema_node(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def _child(schema: dict[str, Any], node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schema of `key` under `node` when it is one of Herd's own (closed) blocks; None for pass-through."""
    node = _schema_node(schema, node)
    child = node.get("properties", {}).get(key)
    if child is None and isinstance(node.get("additionalProperties"), dict):
        child = node["additionalProperties"]
    if child is None:
        return None
    child = _schema_node(schema, child)
    extra = child.get("additionalProperties")
    closed = "properties" in child or (isinstance(extra, dict) and "$ref" in extra)  # `models`: Herd's, by name
    return child if closed else {}


@pytest.mark.parametrize("values_file", ["values.yaml", *[f for f in PROFILES.values() if f]])
def test_every_value_is_documented(values_file: str) -> None:
    """Each of Herd's own keys has a `# --` comment right above it (pass-through blocks are documented whole)."""
    import json

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    text = (CHART_DIR / values_file).read_text()
    lines = text.splitlines()

    def documented(line: int) -> bool:
        line -= 1
        while line >= 0 and lines[line].lstrip().startswith("#"):
            if lines[line].lstrip().startswith("# --"):
                return True
            line -= 1
        return False

    missing: list[str] = []

    def walk(node: yaml.Node, node_schema: dict[str, Any] | None, where: str) -> None:
        if not isinstance(node, yaml.MappingNode) or not node_schema:
            return
        for key, value in node.value:
            if not documented(key.start_mark.line):
                missing.append(f"{where}{key.value} (line {key.start_mark.line + 1})")
            walk(value, _child(schema, node_schema, key.value), f"{where}{key.value}.")

    walk(yaml.compose(text), schema, "")
    assert missing == [], f"{values_file}: keys without a `# --` comment: {missing}"


# ------------------------------------------------------------------------------------------ what gets rendered


@profiles
def test_one_rayservice_per_enabled_model(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    rendered = rendered_profiles[profile]
    rayservices = rendered.kind("RayService")
    assert {rs["metadata"]["labels"]["herd.io/model"] for rs in rayservices} == MODELS[profile]
    assert sorted(rs["metadata"]["name"] for rs in rayservices) == sorted(f"{FULLNAME}-{m}" for m in MODELS[profile])
    for rs in rayservices:
        model = rs["metadata"]["labels"]["herd.io/model"]
        assert [app["name"] for app in serve_config(rs)["applications"]] == [model]
        assert app_args(rs)["name"] == model
        # The gateway's way in: Serve's gRPC proxies of exactly this model's Ray pods.
        grpc = rendered.one("Service", f"{rs['metadata']['name']}-serve-grpc")
        assert grpc["spec"]["selector"]["herd.io/model"] == model
        assert grpc["spec"]["selector"]["ray.io/serve"] == "true"
        assert [(p["port"], p["targetPort"]) for p in grpc["spec"]["ports"]] == [(9000, "serve-grpc")]
        assert serve_config(rs)["grpc_options"]["port"] == 9000
        cluster = rs["spec"]["rayClusterConfig"]
        for pod in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
            assert matches(grpc["spec"]["selector"], {**pod["metadata"]["labels"], "ray.io/serve": "true"})
            ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
            assert ports["serve-grpc"] == 9000
        head_ports = {p["name"]: p["containerPort"]
                      for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert head_ports["serve"] == 8000  # KubeRay builds <rayservice>-serve-svc from this one


def test_profiles_combine_into_one_release_per_model(render) -> None:
    rendered = render(deep_merge(profile_values("maverick"), profile_values("scout")))  # -f maverick -f scout
    assert sorted(rs["metadata"]["name"] for rs in rendered.kind("RayService")) == ["herd-maverick", "herd-scout"]
    assert sorted(m["name"] for m in yaml.safe_load(settings_text(rendered))["models"]) == ["maverick", "scout"]
    if crd_available():
        for rs in rendered.kind("RayService"):
            validate_rayservice(rs)


@profiles
def test_ray_autoscaling_is_on_and_worker_bounds_hold(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    for rs in rendered_profiles[profile].kind("RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True
        for group in cluster["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@profiles
def test_head_and_worker_groups(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    for rs in rendered_profiles[profile].kind("RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # no replica lands on the head
        assert head["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        (group,) = cluster["workerGroupSpecs"]
        worker = group["template"]["spec"]
        limits = worker["containers"][0]["resources"]["limits"]
        if profile in GPU_PROFILES:
            assert group["groupName"] == "gpu"
            assert limits["nvidia.com/gpu"] >= 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
            if profile != "defaults":
                assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        else:
            assert group["groupName"] == "cpu"


@profiles
def test_a_replica_fits_one_worker_pod_and_the_pods_hold_max_replicas(
        rendered_profiles: dict[str, Rendered], profile: str, tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles[profile]
    settings = load_settings(settings_text(rendered), tmp_path)
    for rs in rendered.kind("RayService"):
        args = app_args(rs)
        deployment = args["deployment"]
        assert deployment["placement_strategy"] == "STRICT_PACK"  # the whole placement group on one node
        shards = 0 if args["transport"] == "local" else args["shards"]
        (group,) = worker_groups(rs)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = math.floor(cpus(limits["cpu"]) / (1 + shards))  # build_app: one CPU per bundle
        if deployment["gpus"]:
            need = args.get("trunks", 1) * deployment["trunk_gpus"] + shards * deployment["shard_gpus"]
            per_pod = min(per_pod, math.floor(limits["nvidia.com/gpu"] / need + 1e-9))
        else:
            assert "nvidia.com/gpu" not in limits
        assert per_pod >= 1, f"{rs['metadata']['name']}: a replica does not fit in a worker pod ({limits})"
        (model,) = [m for m in settings.models if m.name == args["name"]]
        assert per_pod * group["maxReplicas"] >= model.autoscale.max_replicas


def test_the_m_to_n_profile_is_two_trunks_and_six_shards_on_one_8_gpu_worker_pod(
        rendered_profiles: dict[str, Rendered], tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles["scout-mn"]
    rs = rendered.one("RayService", f"{FULLNAME}-scout")
    args = app_args(rs)
    (group,) = worker_groups(rs)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert (args["trunks"], args["shards"], args["transport"]) == (2, 6, "collective")
    assert args["engine"]["micro_batches"] == 2
    (model,) = load_settings(settings_text(rendered), tmp_path).models  # herd accepts the layout
    assert model.trunks == 2 and model.gpus_per_replica == 8


def test_maverick_replica_is_one_8_gpu_worker_pod(rendered_profiles: dict[str, Rendered]) -> None:
    rs = rendered_profiles["maverick"].one("RayService", f"{FULLNAME}-maverick")
    args = app_args(rs)
    (group,) = worker_groups(rs)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 8
    assert args["shards"] == 7 and args["transport"] == "grpc"
    d = args["deployment"]
    assert d["gpus"] is True
    assert d["trunk_gpus"] + args["shards"] * d["shard_gpus"] == 8
    assert (args["engine"]["device"], args["engine"]["dtype"]) == ("cuda", "bfloat16")


def test_scout_replica_is_one_4_gpu_worker_pod(rendered_profiles: dict[str, Rendered]) -> None:
    rs = rendered_profiles["scout"].one("RayService", f"{FULLNAME}-scout")
    args = app_args(rs)
    d = args["deployment"]
    (group,) = worker_groups(rs)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert args["shards"] == 3 and d["trunk_gpus"] + args["shards"] * d["shard_gpus"] == 4


@pytest.mark.parametrize(("profile", "weights"), [("scout", "bf16"), ("scout-mn", "bf16"), ("maverick", "fp8")])
def test_gpu_profiles_are_the_planners(rendered_profiles: dict[str, Rendered], profile: str, weights: str) -> None:
    """The engine of each GPU profile starts on the real config (its KV split holds a full-length sequence),
    and the capacity planner says the replica fits its GPUs with that KV cache and batch (each trunk's, for M:N)."""
    from herd.engine import EngineConfig
    from herd.platform.capacity.cli import load_model_config
    from herd.platform.capacity.gpus import gpu_type
    from herd.platform.capacity.memory import Workload, trunk_activation_bytes
    from herd.platform.capacity.plan import plan

    name = profile.split("-")[0]
    args = app_args(rendered_profiles[profile].one("RayService", f"{FULLNAME}-{name}"))
    engine = {k: v for k, v in args["engine"].items() if k not in ("dtype", "device")}
    config = EngineConfig(**engine)
    model, vision, _ = load_model_config(name)
    config.kv_layout(model.text)  # raises if the split cannot hold one sequence of max_model_len
    trunks = args.get("trunks", 1)
    gpus = int(trunks * args["deployment"]["trunk_gpus"] + args["shards"] * args["deployment"]["shard_gpus"])
    result = plan(model.text, vision, weight_format=weights, gpu=gpu_type("h100"), num_gpus=gpus, trunks=trunks,
                  load=Workload(sequences=trunks * config.max_num_seqs, context_tokens=1,
                                step_tokens=config.max_num_batched_tokens))
    trunk = result.gpus[0]
    roles = [g.role for g in result.gpus]
    assert sum(role.startswith("trunk") for role in roles) == trunks and len(roles) == args["shards"] + trunks
    kv_room = trunk.capacity_bytes - sum(trunk.weights.values()) - trunk.reserve_bytes - trunk_activation_bytes(
        model.text, Workload(sequences=config.max_num_seqs, context_tokens=config.context_limit(model.text),
                             step_tokens=config.max_num_batched_tokens))
    assert 0.95 * kv_room <= config.kv_cache_bytes <= kv_room, "the KV cache is the room the planner leaves"
    assert all(g.fits for g in result.gpus[1:])


def test_dev_profile_is_the_tiny_model_on_cpu(rendered_profiles: dict[str, Rendered]) -> None:
    rendered = rendered_profiles["dev"]
    rs = rendered.one("RayService", f"{FULLNAME}-scout")
    args = app_args(rs)
    assert args["engine"]["device"] == "cpu" and args["deployment"]["gpus"] is False
    assert args["path"] == "/models/scout"
    for where, pod in rendered.pod_templates():
        for container in containers(pod):
            for block in container.get("resources", {}).values():
                assert "nvidia.com/gpu" not in block, where
        assert pod["spec"].get("tolerations") is None, where
        if "weights" in {v["name"] for v in pod["spec"]["volumes"]}:
            (weights,) = [v for v in pod["spec"]["volumes"] if v["name"] == "weights"]
            assert "emptyDir" in weights, where
            (init,) = pod["spec"]["initContainers"]
            assert init["command"][:4] == ["herd", "make-tiny", "--preset", "scout"]
            assert init["command"][init["command"].index("--out") + 1] == "/models/scout"
    assert rendered.kind("PersistentVolumeClaim") == []
    gateway = rendered.one("Deployment", f"{FULLNAME}-gateway")
    assert gateway["spec"]["replicas"] == 1  # SQLite lives in the pod


@profiles
def test_pods_run_as_non_root_with_read_only_root_filesystems(rendered_profiles: dict[str, Rendered],
                                                              profile: str) -> None:
    for where, pod in rendered_profiles[profile].pod_templates():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for container in containers(pod):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, f"{where}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, f"{where}/{container['name']}"
            assert context["capabilities"]["drop"] == ["ALL"], f"{where}/{container['name']}"
            writable = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
            assert "/tmp" in writable, f"{where}/{container['name']}: no writable /tmp"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"], where


@profiles
def test_weights_are_shared_read_only(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    rendered = rendered_profiles[profile]
    mounting = set()
    for where, pod in rendered.pod_templates():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        if "weights" not in volumes:
            continue
        mounting.add(where.split("/")[0] + "/" + where.split("/")[1])
        if profile != "dev":
            assert volumes["weights"]["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-weights",
                                                                   "readOnly": True}, where
        for container in containers(pod, init=False):
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "weights"]
            assert mount == {"name": "weights", "mountPath": "/models", "readOnly": True}, where
    assert f"Deployment/{FULLNAME}-gateway" in mounting  # the tokenizer
    assert f"Deployment/{FULLNAME}-controlplane" not in mounting
    assert {f"RayService/{FULLNAME}-{m}" for m in MODELS[profile]} <= mounting
    if profile != "dev":
        pvc = rendered.one("PersistentVolumeClaim", f"{FULLNAME}-weights")
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_an_existing_weights_claim_is_used_not_created(render) -> None:
    rendered = render({"weights": {"existingClaim": "llama4-checkpoints"}})
    assert rendered.kind("PersistentVolumeClaim") == []
    for where, pod in rendered.pod_templates():
        for volume in pod["spec"]["volumes"]:
            if volume["name"] == "weights":
                assert volume["persistentVolumeClaim"] == {"claimName": "llama4-checkpoints", "readOnly": True}, where


@profiles
def test_controlplane_rbac_is_least_privilege(rendered_profiles: dict[str, Rendered], profile: str,
                                              tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles[profile]
    name = f"{FULLNAME}-controlplane"
    lease = load_settings(settings_text(rendered), tmp_path).controlplane.lease_name
    role = rendered.one("Role", name)
    rules = sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])),
                    tuple(r.get("resourceNames", ()))) for r in role["rules"])
    assert rules == sorted([
        (("ray.io",), ("rayservices",), ("get", "list", "patch", "watch"), ()),
        (("coordination.k8s.io",), ("leases",), ("create",), ()),  # a Role cannot name what is not made yet
        (("coordination.k8s.io",), ("leases",), ("get", "patch"), (lease,)),  # leader.py: read, patch
    ])
    assert rendered.kind("ClusterRole") == [] and rendered.kind("ClusterRoleBinding") == []
    binding = rendered.one("RoleBinding", name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    rendered.one("ServiceAccount", name)
    deployment = rendered.one("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == name
    assert pod["containers"][0]["command"] == ["herd", "controlplane", "--config", SETTINGS_PATH]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # the Lease holder
    gateway = rendered.one("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    assert gateway["automountServiceAccountToken"] is False


def test_no_controlplane_no_rbac(render) -> None:
    rendered = render({"controlplane": {"enabled": False}})
    assert [obj["kind"] for _, obj in rendered.objects if "controlplane" in obj["metadata"]["name"]] == []


@profiles
def test_network_policy_admits_only_the_release_to_ray_pods(rendered_profiles: dict[str, Rendered],
                                                            profile: str) -> None:
    rendered = rendered_profiles[profile]
    policy = rendered.one("NetworkPolicy", f"{FULLNAME}-ray")
    spec = policy["spec"]
    selector = spec["podSelector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    pods = rendered.pod_templates()
    for where, pod in pods:
        assert matches(selector, pod["metadata"]["labels"]) == where.startswith("RayService/"), where
    ray_rule, gateway_rule, operator_peer = spec["ingress"]
    (peer,) = ray_rule["from"]
    assert set(peer) == {"podSelector"} and "ports" not in ray_rule  # same namespace, any port: Ray talks on many
    (gateway_peer,) = gateway_rule["from"]
    assert gateway_rule["ports"] == [{"protocol": "TCP", "port": 9000}]  # Serve's gRPC proxy, nothing else
    for where, pod in pods:  # the Ray pods reach each other; the gateway reaches them on one port
        assert matches(peer["podSelector"]["matchLabels"], pod["metadata"]["labels"]) == \
            where.startswith("RayService/"), where
        assert matches(gateway_peer["podSelector"]["matchLabels"], pod["metadata"]["labels"]) == \
            (where == f"Deployment/{FULLNAME}-gateway"), where
    other_release = {**pods[0][1]["metadata"]["labels"], "app.kubernetes.io/instance": "other"}
    assert not matches(peer["podSelector"]["matchLabels"], other_release)
    assert not matches(gateway_peer["podSelector"]["matchLabels"], other_release)
    (operator,) = operator_peer["from"]
    assert operator["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert sorted(p["port"] for p in operator_peer["ports"]) == [8000, 8265, 52365]
    for rule in spec["ingress"]:
        assert all("ipBlock" not in p for p in rule["from"])


@profiles
def test_gateway_deployment_service_hpa_pdb(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    rendered = rendered_profiles[profile]
    name = f"{FULLNAME}-gateway"
    deployment = rendered.one("Deployment", name)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["herd", "gateway", "--config", SETTINGS_PATH]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 50051, "ops": 9401}
    config = [m for m in container["volumeMounts"] if m["mountPath"] == SETTINGS_PATH]
    assert config == [{"name": "config", "mountPath": SETTINGS_PATH, "subPath": "herd.yaml", "readOnly": True}]
    # The public port's cheap checks: a model's RayService restarting must not kill the gateway.
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert "checksum/config" in pod["metadata"]["annotations"]  # a settings change rolls the pods
    service = rendered.one("Service", name)
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    assert sorted((p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]) == [
        ("grpc", 50051, "grpc"), ("http", 8000, "http")]
    for where, other in rendered.pod_templates():  # the gateway Service reaches gateway pods only
        assert matches(service["spec"]["selector"], other["metadata"]["labels"]) == (where == f"Deployment/{name}")
    if profile == "dev":
        assert rendered.kind("HorizontalPodAutoscaler") == rendered.kind("PodDisruptionBudget") == []
        return
    hpa = rendered.one("HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    pdb = rendered.one("PodDisruptionBudget", name)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert not any(matches(pdb["spec"]["selector"]["matchLabels"], p["metadata"]["labels"])
                   for where, p in rendered.pod_templates() if where != f"Deployment/{name}")


def test_service_monitor_only_when_enabled(rendered_profiles: dict[str, Rendered], render) -> None:
    for rendered in rendered_profiles.values():
        assert rendered.kind("ServiceMonitor") == []
    rendered = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}})
    (monitor,) = rendered.kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]
    selected = [svc for svc in rendered.kind("Service") if selects(selector, svc["metadata"]["labels"])]
    assert {svc["metadata"]["name"] for svc in selected} == {f"{FULLNAME}-gateway-ops", f"{FULLNAME}-controlplane"}, \
        "each gateway pod once, on its operator port (not the public or the headless Service), and the control plane"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for svc in selected:
        assert ports & {p["name"] for p in svc["spec"]["ports"]}, f"{svc['metadata']['name']} has no scraped port"
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    (pods,) = rendered.kind("PodMonitor")
    scraped = [(where, p) for where, p in rendered.pod_templates()
               if matches(pods["spec"]["selector"]["matchLabels"], p["metadata"]["labels"])]
    assert scraped and all(where.startswith("RayService/") for where, _ in scraped), "the Ray pods, nothing else"
    for _, pod in scraped:
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert ports["replica-metrics"] == 9400
    assert [e["port"] for e in pods["spec"]["podMetricsEndpoints"]] == ["replica-metrics"]
    off = render({"serviceMonitor": {"enabled": True}, "telemetry": {"replica_metrics_port": None}})
    assert off.kind("PodMonitor") == []
    assert all("replica-metrics" not in {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
               for _, pod in off.pod_templates())


@profiles
def test_secrets_are_referenced_never_inlined(rendered_profiles: dict[str, Rendered], profile: str,
                                              tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles[profile]
    assert rendered.kind("Secret") == []
    for where, pod in rendered.pod_templates():
        for container in containers(pod):
            for env in container.get("env", []):
                if env["name"].startswith("HERD_TENANCY__"):
                    assert set(env) == {"name", "valueFrom"}, f"{where}: {env['name']} inlined"
    gateway = rendered.one("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in gateway["containers"][0]["env"]}
    volumes = {v["name"]: v for v in gateway["volumes"]}
    tenancy = load_settings(settings_text(rendered), tmp_path).tenancy
    raw = yaml.safe_load(settings_text(rendered))["tenancy"]
    assert "redis_url" not in raw
    if profile == "dev":
        assert not any(k.startswith("HERD_TENANCY__") for k in env) and "admin-token" not in volumes
        assert tenancy.database_url == "sqlite:////var/lib/herd/herd.db"  # in the pod's writable state dir
        assert str(tenancy.admin_token_file) == "/var/lib/herd/admin-token"
        return
    assert "database_url" not in raw
    assert env["HERD_TENANCY__DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "herd-database", "key": "url"}}
    assert env["HERD_TENANCY__REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "herd-redis", "key": "url"}}
    assert volumes["admin-token"]["secret"]["secretName"] == "herd-admin-token"
    assert volumes["admin-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    (mount,) = [m for m in gateway["containers"][0]["volumeMounts"] if m["name"] == "admin-token"]
    assert mount["readOnly"] is True
    assert str(tenancy.admin_token_file) == f"{mount['mountPath']}/token"


# ---------------------------------------------------------------------------------- the settings file and Serve


@profiles
def test_settings_file_loads_with_herd_settings(rendered_profiles: dict[str, Rendered], profile: str,
                                                tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles[profile]
    settings = load_settings(settings_text(rendered), tmp_path)
    rayservices = {rs["metadata"]["labels"]["herd.io/model"]: rs for rs in rendered.kind("RayService")}
    assert {m.name for m in settings.models} == set(rayservices) == MODELS[profile]
    cp = settings.controlplane
    assert cp.rayservices == {model: rs["metadata"]["name"] for model, rs in rayservices.items()}
    assert cp.namespace == NAMESPACE
    # Every gateway pod is read: a headless Service over the gateway's pods, resolved each round.
    pods = rendered.one("Service", f"{FULLNAME}-gateway-pods")
    assert pods["spec"]["clusterIP"] == "None" and cp.resolve_gateways
    gateway_pods = rendered.one("Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"]["labels"]
    assert matches(pods["spec"]["selector"], gateway_pods)
    assert cp.gateway_urls == [f"http://{pods['metadata']['name']}.{NAMESPACE}.svc:9401"]  # the operator port
    (port,) = rendered.one("Deployment", f"{FULLNAME}-controlplane")["spec"]["template"]["spec"]["containers"][0][
        "ports"]
    assert port["containerPort"] == cp.metrics_port == 9090
    for model in settings.models:
        name = rayservices[model.name]["metadata"]["name"]
        grpc = rendered.one("Service", f"{name}-serve-grpc")
        assert model.serve_grpc_target == f"{grpc['metadata']['name']}.{NAMESPACE}.svc:9000"
        assert model.serve_status_url is None  # gateways are kept off the Ray dashboard (test_chart_hardening)
        assert model.path == app_args(rayservices[model.name])["path"]
        assert model.cold_start_wait_s == 30 and model.cold_start_retry_after_s == 30
    assert (settings.http_host, settings.http_port, settings.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert settings.max_request_body_bytes == 16 * 2**20
    assert settings.images.max_images_per_request == 8 and not settings.images.fetch_urls
    # The Secrets arrive as environment variables, laid over the file's tenancy section.
    clean_env.setenv("HERD_TENANCY__DATABASE_URL", "postgresql://herd@db/herd")
    clean_env.setenv("HERD_TENANCY__REDIS_URL", "redis://redis:6379/0")
    with_secrets = load_settings(settings_text(rendered), tmp_path)
    assert with_secrets.tenancy.database_url == "postgresql://herd@db/herd"
    assert with_secrets.tenancy.redis_url == "redis://redis:6379/0"
    assert with_secrets.tenancy.admin_token_file == settings.tenancy.admin_token_file


@profiles
def test_serve_config_is_what_herd_serve_prints(rendered_profiles: dict[str, Rendered], profile: str,
                                                tmp_path: Path, clean_env) -> None:
    """serveConfigV2 == `herd serve --print-config` for the chart's own herd.yaml. herd serve resolves each
    checkpoint on this machine, so the models point at stand-in directories here and the printed paths are put
    back to where the pods mount them (the chart's paths, checked against herd.yaml) before comparing."""
    from herd.platform.server import print_config

    rendered = rendered_profiles[profile]
    raw = yaml.safe_load(settings_text(rendered))
    pod_paths = {}
    for model in raw["models"]:
        pod_paths[model["name"]] = model["path"]
        local = tmp_path / "checkpoints" / model["path"].lstrip("/")
        local.mkdir(parents=True)
        (local / "config.json").write_text("{}")
        model["path"] = str(local)
    settings = load_settings(yaml.safe_dump(raw), tmp_path)
    printed = yaml.safe_load(print_config(settings))
    for app in printed["applications"]:
        assert Path(app["args"]["path"]) == (tmp_path / "checkpoints" / pod_paths[app["name"]].lstrip("/")).resolve()
        app["args"]["path"] = pod_paths[app["name"]]
    for rs in rendered.kind("RayService"):
        model = rs["metadata"]["labels"]["herd.io/model"]
        expected = {**printed, "applications": [a for a in printed["applications"] if a["name"] == model]}
        assert _typed(serve_config(rs)) == _typed(expected)
        assert _keys(serve_config(rs)) == _keys(expected)  # and in the order herd prints them


def _typed(value: Any) -> Any:
    """Compare numbers as numbers (YAML 30 == 30.0) but never a bool as a number."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    return ("number", float(value))


def _keys(value: Any) -> Any:
    if isinstance(value, dict):
        return [(k, _keys(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_keys(v) for v in value]
    return None


# ------------------------------------------------------------------------------------------------ names, notes


def test_long_release_names_keep_rayservice_names_within_kuberays_limit(render) -> None:
    release = "llama4-production-inference-eu-west-1-blue"  # 42 characters
    rendered = render(deep_merge(profile_values("maverick"), {"models": {"a-twenty-char-model1": {
        "path": "m", "worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}}), release=release)
    names = [rs["metadata"]["name"] for rs in rendered.kind("RayService")]
    assert len(names) == 2 and all(len(n) <= 47 for n in names), names
    for _, obj in rendered.objects:
        assert len(obj["metadata"]["name"]) <= 63
    if crd_available():
        for rs in rendered.kind("RayService"):
            validate_rayservice(rs)


@profiles
def test_notes_name_the_gateway_and_models(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    notes = rendered_profiles[profile].notes
    assert f"svc/{FULLNAME}-gateway" in notes
    for model in MODELS[profile]:
        assert f"RayService {FULLNAME}-{model}" in notes
