"""The Kubernetes actuator and leader election through the official client, against kmock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml
from kubernetes import client
from ray.serve.schema import ServeDeploySchema

from herd.platform.controlplane.actuators import KubernetesActuator, replicas_in, with_replicas
from herd.platform.controlplane.leader import LeaseElector, lease_action
from herd.platform.server import serve_config
from herd.platform.settings import HerdSettings
from tests.kuberay_crd import KUBERAY_DIR, crd_available, validate_rayservice
from tests.unit.platform.controlplane.kube_emulator import kube_api, patches

NAMESPACE = "herd"


def _rayservice(tmp_path, name="scout", **model):
    settings = HerdSettings.load(models_dir=tmp_path, models=[{"name": name, "path": "scout", "shards": 2, **model}])
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": f"herd-{name}", "namespace": NAMESPACE},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(settings), sort_keys=False),
            "rayClusterConfig": {
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
                    {"name": "ray-head", "image": "herd:0.1.0"}]}}},
                "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
                                      "rayStartParams": {}, "template": {"spec": {"containers": [
                                          {"name": "ray-worker", "image": "herd:0.1.0"}]}}}],
            },
        },
    }


def test_the_replica_override_in_serve_config_v2(tmp_path):
    text = _rayservice(tmp_path)["spec"]["serveConfigV2"]
    assert replicas_in(text, "scout") == 1
    patched = with_replicas(with_replicas(text, "scout", 3), "scout", 5)
    assert replicas_in(patched, "scout") == 5
    app = yaml.safe_load(patched)["applications"][0]
    assert app["deployments"] == [{"name": "scout", "num_replicas": 5}], "one override, replaced in place"
    assert app["args"] == yaml.safe_load(text)["applications"][0]["args"], "the code args are untouched"
    with pytest.raises(ValueError, match="no application 'maverick'"):
        with_replicas(text, "maverick", 2)


def test_zero_is_autoscaling_bounds_serve_accepts_and_back_is_a_count(tmp_path):
    text = _rayservice(tmp_path)["spec"]["serveConfigV2"]
    zero = with_replicas(text, "scout", 0)
    (override,) = yaml.safe_load(zero)["applications"][0]["deployments"]
    assert "num_replicas" not in override and override["autoscaling_config"]["max_replicas"] == 1
    assert override["autoscaling_config"]["min_replicas"] == override["autoscaling_config"]["initial_replicas"] == 0
    assert replicas_in(zero, "scout") == 0
    back = with_replicas(zero, "scout", 2)
    assert yaml.safe_load(back)["applications"][0]["deployments"] == [{"name": "scout", "num_replicas": 2}]
    for config in (text, zero, back):
        ServeDeploySchema.model_validate(yaml.safe_load(config))  # what Serve (and so KubeRay) accepts
    as_count = yaml.safe_load(text)
    as_count["applications"][0]["deployments"] = [{"name": "scout", "num_replicas": 0}]
    with pytest.raises(ValueError, match="num_replicas"):  # why zero cannot be a count
        ServeDeploySchema.model_validate(as_count)


def test_each_pool_of_a_disaggregated_model_has_its_own_override(tmp_path):
    text = _rayservice(tmp_path, disaggregation={"prefill_replicas": 2, "decode_replicas": 3})["spec"]["serveConfigV2"]
    assert (replicas_in(text, "scout", "scout-prefill"), replicas_in(text, "scout", "scout-decode")) == (2, 3), \
        "before any override: the counts the pools start with"
    assert replicas_in(text, "scout") == 1, "the proxy's own"
    patched = with_replicas(with_replicas(with_replicas(text, "scout", 4, "scout-decode"), "scout", 1,
                                          "scout-prefill"), "scout", 5, "scout-decode")
    app = yaml.safe_load(patched)["applications"][0]
    assert app["deployments"] == [{"name": "scout-prefill", "num_replicas": 1},
                                  {"name": "scout-decode", "num_replicas": 5}], "one per pool; none for the proxy"
    assert (replicas_in(patched, "scout", "scout-prefill"), replicas_in(patched, "scout", "scout-decode")) == (1, 5)
    assert app["args"] == yaml.safe_load(text)["applications"][0]["args"], "the code args are untouched"
    ServeDeploySchema.model_validate(yaml.safe_load(patched))


@pytest.mark.skipif(not crd_available(), reason=f"KubeRay's CRDs are not in {KUBERAY_DIR}")
def test_scaling_a_pool_patches_its_override(tmp_path):
    rayservice = _rayservice(tmp_path, disaggregation={"prefill_replicas": 1, "decode_replicas": 2})
    with kube_api() as (api, _emulator):
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", rayservice)
        actuator = KubernetesActuator(objects, NAMESPACE, {"scout": "herd-scout"})
        assert actuator.status("scout", "scout-decode").target == 2
        actuator.scale("scout", 4, "scout-decode")
        assert actuator.status("scout", "scout-decode").target == 4
        assert actuator.status("scout", "scout-prefill").target == 1
        stored = objects.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", "herd-scout")
        validate_rayservice(stored)


@pytest.mark.skipif(not crd_available(), reason=f"KubeRay's CRDs are not in {KUBERAY_DIR}")
@pytest.mark.parametrize("replicas", [3, 0])
def test_scaling_patches_only_serve_config_v2(tmp_path, replicas):
    rayservice = _rayservice(tmp_path)
    validate_rayservice(rayservice)
    with kube_api() as (api, emulator):
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", rayservice)
        actuator = KubernetesActuator(objects, NAMESPACE, {"scout": "herd-scout"})
        assert actuator.status("scout").target == 1
        actuator.scale("scout", replicas)
        sent = patches(emulator)
        assert len(sent) == 1
        path, content_type, body = sent[0]
        assert path == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/herd-scout"
        assert content_type == "application/merge-patch+json"
        assert set(body) == {"spec"} and set(body["spec"]) == {"serveConfigV2"}, "never workerGroupSpecs"
        stored = objects.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", "herd-scout")
        assert replicas_in(stored["spec"]["serveConfigV2"], "scout") == replicas
        assert stored["spec"]["rayClusterConfig"] == rayservice["spec"]["rayClusterConfig"]
        assert actuator.status("scout").target == replicas
        validate_rayservice(stored)  # the patched object is still a RayService KubeRay accepts
        ServeDeploySchema.model_validate(yaml.safe_load(stored["spec"]["serveConfigV2"]))


@pytest.mark.parametrize(
    ("spec", "action"),
    [
        (None, "create"),
        ({"holderIdentity": "me", "renewTime": "2026-01-01T00:00:00Z", "leaseDurationSeconds": 15}, "renew"),
        ({"holderIdentity": "other", "renewTime": "2026-01-01T00:00:10Z", "leaseDurationSeconds": 15}, "wait"),
        ({"holderIdentity": "other", "renewTime": "2026-01-01T00:00:00Z", "leaseDurationSeconds": 15}, "take"),
        ({"holderIdentity": "", "renewTime": "2026-01-01T00:00:10Z"}, "take"),
    ],
)
def test_lease_decisions(spec, action):
    assert lease_action(spec, "me", datetime(2026, 1, 1, 0, 0, 16, tzinfo=UTC)) == action


def test_leadership_hands_over_when_the_leader_stops_renewing():
    with kube_api() as (api, _):
        leases = client.CoordinationV1Api(api)
        a = LeaseElector(leases, NAMESPACE, "herd-controlplane", "pod-a", duration_s=15)
        b = LeaseElector(leases, NAMESPACE, "herd-controlplane", "pod-b", duration_s=15)
        t0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
        assert a.try_lead(t0) and not b.try_lead(t0 + timedelta(seconds=1))
        assert a.try_lead(t0 + timedelta(seconds=10)), "a renews"
        assert not b.try_lead(t0 + timedelta(seconds=20)), "a's renewal at 10 s holds until 25 s"
        assert b.try_lead(t0 + timedelta(seconds=26)), "a stopped renewing: b takes over"
        assert not a.try_lead(t0 + timedelta(seconds=27)), "and a, back, must wait"
        lease = leases.read_namespaced_lease("herd-controlplane", NAMESPACE)
        assert lease.spec.holder_identity == "pod-b" and lease.spec.lease_transitions == 1


def test_herd_controlplane_wiring_reads_gateways_takes_the_lease_and_patches(tmp_path, monkeypatch):
    """What `herd controlplane` builds from its settings (kubeconfig, Lease, HTTP load, RayService actuator),
    one round against kmock and a gateway answering /herd/load on loopback."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from herd.platform.controlplane.app import kubernetes_control_plane

    class Gateway(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"scout": {"in_flight": 90, "in_flight_tokens": 0, "waiting_for_replica": 0,
                                         "refused_cold": 0, "ttft_p95_s": 0.5, "output_tokens_per_s": 1.0}})
            self.send_response(200 if self.path == "/herd/load" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rayservice = _rayservice(tmp_path)
    try:
        with kube_api() as (api, _):
            client.CustomObjectsApi(api).create_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices",
                                                                         rayservice)
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": api.configuration.host}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                "users": [{"name": "test", "user": {}}]}))
            monkeypatch.setenv("POD_NAME", "controlplane-0")
            settings = HerdSettings.load(models_dir=tmp_path, models=[
                {"name": "scout", "path": "scout", "shards": 2, "autoscale": {"min_replicas": 1, "max_replicas": 4}}],
                controlplane={"namespace": NAMESPACE, "rayservices": {"scout": "herd-scout"}, "kubeconfig": kubeconfig,
                              "gateway_urls": [f"http://127.0.0.1:{server.server_port}"]})
            plane = kubernetes_control_plane(settings)

            async def one_round():
                decisions = await plane.tick()
                await plane.settle()
                return decisions

            decisions = asyncio.run(one_round())
            assert decisions["scout"].target == 3 and "90 requests" in decisions["scout"].reason
            stored = client.CustomObjectsApi(api).get_namespaced_custom_object("ray.io", "v1", NAMESPACE,
                                                                                "rayservices", "herd-scout")
            assert replicas_in(stored["spec"]["serveConfigV2"], "scout") == 3
            lease = client.CoordinationV1Api(api).read_namespaced_lease("herd-controlplane", NAMESPACE)
            assert lease.spec.holder_identity == "controlplane-0"
    finally:
        server.shutdown()
