"""Kubernetes clients for the control plane (in-cluster service account, else the local kubeconfig)."""

from __future__ import annotations

from typing import Any


def api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def custom_objects(api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api)


def leases(api: Any) -> Any:
    from kubernetes import client

    return client.CoordinationV1Api(api)
