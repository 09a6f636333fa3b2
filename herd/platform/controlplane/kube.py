"""Kubernetes clients for the control plane (in-cluster service account, else the local kubeconfig)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the kubernetes package takes a second to import
    from kubernetes import client as k8s


def api_client(kubeconfig: Path | None = None) -> k8s.ApiClient:
    """A client of its own (the library's default configuration is left alone): from `kubeconfig` when
    given, else the pod's service account, else $KUBECONFIG or ~/.kube/config."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def custom_objects(api: k8s.ApiClient) -> k8s.CustomObjectsApi:
    from kubernetes import client

    return client.CustomObjectsApi(api)


def leases(api: k8s.ApiClient) -> k8s.CoordinationV1Api:
    from kubernetes import client

    return client.CoordinationV1Api(api)
