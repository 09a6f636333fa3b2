"""tests/kuberay_crd.py: the RayService validator accepts what the chart renders and refuses what KubeRay would."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.kuberay_crd import (
    KUBERAY_DIR,
    MAX_RAYSERVICE_NAME,
    RAYSERVICE_CRD,
    RayServiceInvalid,
    crd_available,
    rayservice_errors,
    rayservice_schema,
    validate_rayservice,
)
from tests.unit.helm.conftest import Rendered

pytestmark = pytest.mark.skipif(not crd_available(), reason=f"KubeRay's CRDs are not in {KUBERAY_DIR}")


@pytest.fixture
def rayservice(rendered_profiles: dict[str, Rendered]) -> dict[str, Any]:
    """A valid RayService (the chart's Maverick one), fresh for each test to spoil."""
    (rs,) = rendered_profiles["maverick"].kind("RayService")
    return copy.deepcopy(rs)


def test_crd_is_found_next_to_the_repository() -> None:
    assert RAYSERVICE_CRD.parent == KUBERAY_DIR and RAYSERVICE_CRD.is_file()
    assert rayservice_schema()["properties"]["spec"]["required"] == ["rayClusterConfig"]


def test_valid_rayservice_passes(rayservice: dict[str, Any]) -> None:
    assert rayservice_errors(rayservice) == []
    validate_rayservice(rayservice)


def test_unknown_field_in_spec_is_rejected(rayservice: dict[str, Any]) -> None:
    rayservice["spec"]["serveConfig"] = "applications: []"  # the v1alpha1 name; v1 prunes it
    with pytest.raises(RayServiceInvalid, match=r"spec\.serveConfig: unknown field"):
        validate_rayservice(rayservice)


def test_unknown_field_deep_in_a_pod_template_is_rejected(rayservice: dict[str, Any]) -> None:
    container = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # a typo the API server would silently drop
    errors = rayservice_errors(rayservice)
    assert errors == ["spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].resource: unknown field "
                      "(the API server would drop it)"]


def test_wrong_type_is_rejected_with_its_path(rayservice: dict[str, Any]) -> None:
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(RayServiceInvalid) as caught:
        validate_rayservice(rayservice)
    assert caught.value.errors == ["spec.rayClusterConfig.workerGroupSpecs[0].replicas: 'two' is not of type "
                                   "'integer'"]
    assert "workerGroupSpecs[0].replicas" in str(caught.value)


def test_every_error_is_listed(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscaling"] = "yes"
    cluster["workerGroupSpecs"][0]["minReplicas"] = -1
    cluster["rayVersion"] = 2.6
    del cluster["headGroupSpec"]["template"]
    rayservice["metadata"]["name"] = "Herd_Maverick"
    errors = rayservice_errors(rayservice)
    assert [e.split(":")[0] for e in errors] == sorted([
        "metadata.name", "spec.rayClusterConfig.enableInTreeAutoscaling", "spec.rayClusterConfig.rayVersion",
        "spec.rayClusterConfig.headGroupSpec", "spec.rayClusterConfig.workerGroupSpecs[0].minReplicas"])
    assert "'template' is a required property" in " ".join(errors)


def test_required_fields_with_defaults_are_optional(rayservice: dict[str, Any]) -> None:
    # containers[].ports[].protocol is required in the CRD but defaults to TCP.
    schema = rayservice_schema()["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    ports = schema["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]["containers"][
        "items"]["properties"]["ports"]["items"]
    assert "protocol" not in ports.get("required", []) and ports["required"] == ["containerPort"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert all("protocol" not in p for p in head["ports"])
    assert rayservice_errors(rayservice) == []


def test_int_or_string_takes_both(rayservice: dict[str, Any]) -> None:
    limits = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]
    limits["cpu"], limits["nvidia.com/gpu"] = 32, "8"
    assert rayservice_errors(rayservice) == []
    limits["cpu"] = 32.5
    assert rayservice_errors(rayservice)  # a quantity is an integer or a string, never a float


def test_null_only_where_nullable(rayservice: dict[str, Any]) -> None:
    rayservice["status"] = {"activeServiceStatus": {"rayClusterStatus": {"lastUpdateTime": None}}}
    assert rayservice_errors(rayservice) == []
    rayservice["spec"]["rayClusterConfig"]["rayVersion"] = None
    assert rayservice_errors(rayservice) == ["spec.rayClusterConfig.rayVersion: None is not of type 'string'"]


def test_kuberays_name_rule(rayservice: dict[str, Any]) -> None:
    rayservice["metadata"]["name"] = "h" * MAX_RAYSERVICE_NAME
    assert rayservice_errors(rayservice) == []
    rayservice["metadata"]["name"] = "h" * (MAX_RAYSERVICE_NAME + 1)
    with pytest.raises(RayServiceInvalid, match=r"metadata\.name.*at most 47"):
        validate_rayservice(rayservice)


def test_kuberays_worker_group_rules(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    group = cluster["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 3, 2
    assert rayservice_errors(rayservice) == [
        "spec.rayClusterConfig.workerGroupSpecs[0].minReplicas: 3 is greater than maxReplicas 2"]
    group["minReplicas"] = 1
    del group["maxReplicas"]
    assert rayservice_errors(rayservice) == []  # the autoscaler is on: optional
    cluster["enableInTreeAutoscaling"] = False
    assert rayservice_errors(rayservice) == ["spec.rayClusterConfig.workerGroupSpecs[0]: minReplicas and maxReplicas "
                                             "are both required when autoscaling is off"]


def test_other_kinds_are_refused(rayservice: dict[str, Any]) -> None:
    rayservice["kind"] = "RayCluster"
    assert any("expected apiVersion ray.io/v1, kind RayService" in e for e in rayservice_errors(rayservice))
