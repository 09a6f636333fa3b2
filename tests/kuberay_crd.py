"""Validate RayService objects offline against KubeRay's CRD, as the API server and KubeRay would.

The CRD (ray.io_rayservices.yaml, KubeRay v1.7.0) lives in the workspace's shared folder, next to this
repository: `KUBERAY_DIR`. Its `spec.versions[name=v1].schema.openAPIV3Schema` is JSON Schema draft 4 plus
Kubernetes extensions; `rayservice_schema()` turns it into plain draft 4 the way the API server reads it:

- `nullable: true` allows null (elsewhere null is rejected, stricter than the server, which would drop it);
- an object with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
  is closed (`additionalProperties: false`): the server would silently prune an unknown field, so a typo in
  a manifest or a patch would be lost, and here it is an error instead;
- a `required` field that has a `default` is optional (the server fills it in first);
- `x-kubernetes-int-or-string` accepts an integer or a string.

On top of the schema, `validate_rayservice` applies the few rules KubeRay's controller adds (ValidateRayService*
in ray-operator/controllers/ray/utils/validation.go): the name is a DNS-1035 label of at most 47 characters, and
a worker group's minReplicas and maxReplicas are non-negative, ordered, and both set unless autoscaling is on.

    from tests.kuberay_crd import crd_available, validate_rayservice

    if not crd_available():
        pytest.skip(f"KubeRay CRDs not found in {KUBERAY_DIR}")
    validate_rayservice(obj)   # raises RayServiceInvalid listing every bad path
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_REPO = Path(__file__).resolve().parents[1]
KUBERAY_DIR = next((d for d in (_REPO.parent / "shared" / "kuberay", _REPO / "shared" / "kuberay") if d.is_dir()),
                   _REPO.parent / "shared" / "kuberay")
"""The folder holding KubeRay's CRDs: the workspace's shared/kuberay beside the repository (or inside it)."""

RAYSERVICE_CRD = KUBERAY_DIR / "ray.io_rayservices.yaml"
"""KubeRay's RayService CustomResourceDefinition."""

MAX_RAYSERVICE_NAME = 47
"""KubeRay: 53 (longest RayCluster name) - 6 (the suffix it appends for the cluster)."""

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class RayServiceInvalid(ValueError):
    """A RayService the API server or KubeRay would refuse; `errors` holds one `path: reason` per problem."""

    def __init__(self, name: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"RayService {name!r} is invalid ({len(errors)} errors):\n  " + "\n  ".join(errors))


def crd_available() -> bool:
    """Whether the CRD file is there (callers skip, with KUBERAY_DIR in the reason, when it is not)."""
    return RAYSERVICE_CRD.is_file()


@functools.cache
def rayservice_schema() -> dict[str, Any]:
    """The v1 RayService schema as plain JSON Schema draft 4 (see the module docstring). Cached."""
    if not crd_available():
        raise FileNotFoundError(f"KubeRay's RayService CRD is not at {RAYSERVICE_CRD}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with RAYSERVICE_CRD.open() as f:
        crd = yaml.load(f, Loader=loader)  # a safe loader, C-accelerated when available
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _structural(version["schema"]["openAPIV3Schema"])


def _structural(node: Any) -> Any:
    """One schema node, Kubernetes extensions turned into what they mean for validation."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _structural(value) for key, value in node.items()
           if key not in ("nullable", "x-kubernetes-validations")}  # CEL rules are the server's, not ours
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    properties = node.get("properties")
    if isinstance(properties, dict):
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if "required" in node:
            required = [name for name in node["required"] if "default" not in properties.get(name, {})]
            if required:
                out["required"] = required
            else:
                out.pop("required")
    return out


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    schema = rayservice_schema()
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def rayservice_errors(obj: dict[str, Any]) -> list[str]:
    """Every problem with `obj` as `path: reason` (empty when it is a valid RayService), sorted by path."""
    errors: list[str] = []
    for error in _validator().iter_errors(obj):
        where = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = error.schema.get("properties", {})
            for key in sorted(k for k in error.instance if k not in known):
                errors.append(f"{_path([*where, key])}: unknown field (the API server would drop it)")
            continue
        errors.append(f"{_path(where)}: {error.message}")
    if obj.get("apiVersion") != "ray.io/v1" or obj.get("kind") != "RayService":
        errors.append(f"<root>: expected apiVersion ray.io/v1, kind RayService; got "
                      f"{obj.get('apiVersion')!r}, {obj.get('kind')!r}")
    errors += _controller_errors(obj)
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > MAX_RAYSERVICE_NAME or not _DNS_1035.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} "
                      "characters (KubeRay refuses it)")
    return sorted(errors)


def _controller_errors(obj: dict[str, Any]) -> list[str]:
    """KubeRay's ValidateRayClusterSpec checks on worker groups that the schema cannot express."""
    cluster = (obj.get("spec") or {}).get("rayClusterConfig") or {}
    groups = cluster.get("workerGroupSpecs") or []
    autoscaling = cluster.get("enableInTreeAutoscaling") is True
    errors = []
    for index, group in enumerate(groups if isinstance(groups, list) else []):
        if not isinstance(group, dict):
            continue
        where = f"spec.rayClusterConfig.workerGroupSpecs[{index}]"
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"{where}: minReplicas and maxReplicas are both required when autoscaling is off")
        for key, value in (("minReplicas", low), ("maxReplicas", high)):
            if isinstance(value, int) and value < 0:
                errors.append(f"{where}.{key}: {value} is negative")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"{where}.minReplicas: {low} is greater than maxReplicas {high}")
    return errors


def validate_rayservice(obj: dict[str, Any]) -> None:
    """Raise RayServiceInvalid, naming the path of every error, unless `obj` is a valid v1 RayService."""
    errors = rayservice_errors(obj)
    if errors:
        raise RayServiceInvalid(str((obj.get("metadata") or {}).get("name")), errors)


__all__ = ["KUBERAY_DIR", "MAX_RAYSERVICE_NAME", "RAYSERVICE_CRD", "RayServiceInvalid", "crd_available",
           "rayservice_errors", "rayservice_schema", "validate_rayservice"]
