"""The Kubernetes actuator and leader election through the official client, against kmock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml
from kubernetes import client

from herd.platform.controlplane.actuators import KubernetesActuator, replicas_in, with_replicas
from herd.platform.controlplane.leader import LeaseElector, lease_action
from herd.platform.server import serve_config
from herd.platform.settings import HerdSettings
from tests.unit.platform.controlplane.kube_emulator import kube_api, patches

NAMESPACE = "herd"


def _rayservice(tmp_path, name="scout"):
    settings = HerdSettings.load(models_dir=tmp_path, models=[{"name": name, "path": "scout", "shards": 2}])
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


def test_scaling_patches_only_serve_config_v2(tmp_path):
    rayservice = _rayservice(tmp_path)
    with kube_api() as (api, emulator):
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", rayservice)
        actuator = KubernetesActuator(objects, NAMESPACE, {"scout": "herd-scout"})
        assert actuator.status("scout").target == 1
        actuator.scale("scout", 3)
        sent = patches(emulator)
        assert len(sent) == 1
        path, content_type, body = sent[0]
        assert path == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/herd-scout"
        assert content_type == "application/merge-patch+json"
        assert set(body) == {"spec"} and set(body["spec"]) == {"serveConfigV2"}, "never workerGroupSpecs"
        stored = objects.get_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices", "herd-scout")
        assert replicas_in(stored["spec"]["serveConfigV2"], "scout") == 3
        assert stored["spec"]["rayClusterConfig"] == rayservice["spec"]["rayClusterConfig"]
        assert actuator.status("scout") .target == 3


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
