"""The chart's side of issue 17: shutdown budgets within the pods' grace periods and a journal volume that can
outlive the pod (4); who may talk to whom, the gateway's egress and the Ray pods' ingress (8); the operator port
on its own Service (11); the expert shards' mutual TLS from a Secret (12). Rendered by real Helm, as test_chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.kuberay_crd import crd_available, validate_rayservice
from tests.unit.helm.conftest import NAMESPACE, PROFILES, Rendered, deep_merge, profile_values
from tests.unit.helm.test_chart import (
    CUSTOM_KINDS,
    FULLNAME,
    KUBE_VERSION,
    _keys,
    _typed,
    app_args,
    load_settings,
    matches,
    selects,
    serve_config,
    settings_text,
)

profiles = pytest.mark.parametrize("profile", list(PROFILES))
GATEWAY = f"{FULLNAME}-gateway"
SHARD_TLS_DIR = "/etc/herd/shard-tls"
PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10"]
RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": 8000,
             "serve-grpc": 9000, "replica-metrics": 9400, "dashboard-agent": 52365, "object-manager": 8076}
"""Ports a Ray pod listens on (the named ones the chart declares, and some Ray opens unnamed)."""


def pods(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return dict(rendered.pod_templates())


def gateway_pod(rendered: Rendered) -> dict[str, Any]:
    return pods(rendered)[f"Deployment/{GATEWAY}"]


def ray_pods(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(where, pod) for where, pod in rendered.pod_templates() if where.startswith("RayService/")]


def settings_yaml(rendered: Rendered) -> dict[str, Any]:
    return yaml.safe_load(settings_text(rendered))


def all_valid(rendered: Rendered) -> None:
    for _, obj in rendered.objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    if crd_available():
        for rs in rendered.kind("RayService"):
            validate_rayservice(rs)


def admitted(rules: list[dict[str, Any]], labels: dict[str, str], port: int,
             named: dict[str, int] | None = None) -> bool:
    """Whether NetworkPolicy ingress `rules` let a pod of this namespace with `labels` in on `port` (port names
    resolved through `named`, the target pod's container ports)."""
    for rule in rules:
        peers = rule.get("from")
        peer_ok = peers is None or any(
            "podSelector" in peer and "ipBlock" not in peer and selects(peer["podSelector"], labels)
            for peer in peers)
        ports = rule.get("ports")
        port_ok = ports is None or any((named or {}).get(p["port"], p["port"]) == port for p in ports)
        if peer_ok and port_ok:
            return True
    return False


# ------------------------------------------------------------------------------------- 4: shutdown and journal


@profiles
def test_grace_periods_hold_the_shutdown_budgets(rendered_profiles: dict[str, Rendered], profile: str,
                                                 tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles[profile]
    settings = load_settings(settings_text(rendered), tmp_path)
    assert settings.shutdown_timeout_s == 25
    grace = gateway_pod(rendered)["spec"]["terminationGracePeriodSeconds"]
    assert grace == math.ceil(settings.shutdown_timeout_s) + 5
    for rs in rendered.kind("RayService"):
        drain = app_args(rs)["drain_timeout_s"]
        cluster = rs["spec"]["rayClusterConfig"]
        for pod in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
            assert pod["spec"]["terminationGracePeriodSeconds"] == math.ceil(drain) + 5, rs["metadata"]["name"]


def test_grace_periods_follow_the_values(render, tmp_path: Path, clean_env) -> None:
    rendered = render({"settings": {"shutdown_timeout_s": 50.5}, "terminationGraceMarginSeconds": 10,
                       "models": {"scout": {"drain_timeout_s": 120}}})
    assert load_settings(settings_text(rendered), tmp_path).shutdown_timeout_s == 50.5
    assert gateway_pod(rendered)["spec"]["terminationGracePeriodSeconds"] == 61
    for where, pod in ray_pods(rendered):
        assert pod["spec"]["terminationGracePeriodSeconds"] == 130, where


def _state(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = gateway_pod(rendered)["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "state"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "state"]
    return volume, mount


@profiles
def test_the_journal_is_in_the_state_volume(rendered_profiles: dict[str, Rendered], profile: str, tmp_path: Path,
                                           clean_env) -> None:
    rendered = rendered_profiles[profile]
    volume, mount = _state(rendered)
    assert "emptyDir" in volume  # by default: it survives a container restart, not the pod
    spill = load_settings(settings_text(rendered), tmp_path).tenancy.spill_path
    assert str(spill).startswith(mount["mountPath"] + "/")


def test_a_state_claim_keeps_the_journal_past_the_pod(render, tmp_path: Path, clean_env) -> None:
    one = {"gateway": {"replicas": 1, "autoscaling": {"enabled": False}, "state": {"existingClaim": "herd-state"}}}
    rendered = render(deep_merge(profile_values("dev"), one))
    volume, mount = _state(rendered)
    assert volume == {"name": "state", "persistentVolumeClaim": {"claimName": "herd-state"}}
    assert not mount.get("readOnly")
    deployment = rendered.one("Deployment", GATEWAY)
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two gateways on one journal
    settings = load_settings(settings_text(rendered), tmp_path)
    assert str(settings.tenancy.spill_path).startswith(mount["mountPath"] + "/")
    assert settings.tenancy.database_url == f"sqlite:///{mount['mountPath']}/herd.db"  # SQLite survives too
    assert rendered.one("Deployment", GATEWAY)["spec"]["replicas"] == 1
    all_valid(rendered)
    with pytest.raises(helm.HelmError) as caught:
        render({"gateway": {"state": {"existingClaim": "herd-state"}}})  # the HPA runs several gateways
    assert "gateway.state.existingClaim" in str(caught.value) and "one gateway" in str(caught.value)


# ------------------------------------------------------------------------------------------ 8: network policies


def _gateway_policy(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("NetworkPolicy", GATEWAY)["spec"]


@profiles
def test_the_gateway_egress_is_dns_serve_grpc_and_the_stores(rendered_profiles: dict[str, Rendered],
                                                            profile: str) -> None:
    rendered = rendered_profiles[profile]
    spec = _gateway_policy(rendered)
    for where, pod in rendered.pod_templates():
        assert matches(spec["podSelector"]["matchLabels"], pod["metadata"]["labels"]) == \
            (where == f"Deployment/{GATEWAY}"), where
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    egress = spec["egress"]
    dns = [r for r in egress if {p["port"] for p in r.get("ports", [])} == {53}]
    assert len(dns) == 1 and sorted(p["protocol"] for p in dns[0]["ports"]) == ["TCP", "UDP"]
    (dns_peer,) = dns[0]["to"]
    assert dns_peer["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    ray = [r for r in egress if any("podSelector" in p and selects(p["podSelector"], pod["metadata"]["labels"])
                                    for p in r.get("to", []) for _, pod in ray_pods(rendered))]
    assert len(ray) == 1 and ray[0]["ports"] == [{"protocol": "TCP", "port": 9000}]  # Serve's gRPC proxy only
    ports = sorted(p["port"] for r in egress for p in r.get("ports", []) if p["port"] not in (53, 9000))
    assert ports == [5432, 6379]  # PostgreSQL and Redis
    assert not any("ipBlock" in peer for r in egress for peer in r.get("to", []))  # no internet: no image fetches
    assert all("ports" in r for r in egress), "every egress rule is limited to its ports"


def test_image_fetching_opens_the_public_internet_only(render) -> None:
    spec = _gateway_policy(render({"images": {"fetch_urls": True}}))
    blocks = [peer["ipBlock"] for r in spec["egress"] for peer in r.get("to", []) if "ipBlock" in peer]
    v4 = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    assert len(v4) == 1 and set(PRIVATE) <= set(v4[0]["except"])
    assert all(b["cidr"] in ("0.0.0.0/0", "::/0") for b in blocks)
    v6 = [b for b in blocks if b["cidr"] == "::/0"]
    assert len(v6) == 1 and {"fc00::/7", "fe80::/10", "::1/128"} <= set(v6[0]["except"])


def test_the_fetch_allow_list_reaches_the_settings_and_the_policy(render, tmp_path: Path, clean_env) -> None:
    rendered = render({"images": {"fetch_urls": True, "fetch_allow_networks": ["10.1.0.0/16", "fd00:1::/64"]}})
    assert load_settings(settings_text(rendered), tmp_path).images.fetch_allow_networks == ["10.1.0.0/16",
                                                                                             "fd00:1::/64"]
    blocks = [r["to"] for r in _gateway_policy(rendered)["egress"]
              if any(peer.get("ipBlock", {}).get("cidr") == "10.1.0.0/16" for peer in r.get("to", []))]
    assert blocks == [[{"ipBlock": {"cidr": "10.1.0.0/16"}}, {"ipBlock": {"cidr": "fd00:1::/64"}}]]
    all_valid(rendered)
    without_fetching = render({"images": {"fetch_allow_networks": ["10.1.0.0/16"]}})
    assert not any("ipBlock" in peer for r in _gateway_policy(without_fetching)["egress"] for peer in r.get("to", []))
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"images": {"fetch_allow_networks": ["localhost"]}})
    assert "/images/fetch_allow_networks/0" in str(caught.value)


def test_gateway_store_peers_come_from_values(render) -> None:
    peers = {"database": {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [5433]},
             "redis": {"to": [{"podSelector": {"matchLabels": {"app": "redis"}}}], "ports": [6380]}}
    rendered = render({"networkPolicy": {"gateway": peers}})
    egress = _gateway_policy(rendered)["egress"]
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 5433}]} in egress
    assert {"to": [{"podSelector": {"matchLabels": {"app": "redis"}}}],
            "ports": [{"protocol": "TCP", "port": 6380}]} in egress
    all_valid(rendered)


@profiles
def test_gateways_reach_only_serve_grpc_on_the_ray_pods(rendered_profiles: dict[str, Rendered],
                                                        profile: str) -> None:
    rendered = rendered_profiles[profile]
    rules = rendered.one("NetworkPolicy", f"{FULLNAME}-ray")["spec"]["ingress"]
    gateway = gateway_pod(rendered)["metadata"]["labels"]
    controlplane = pods(rendered)[f"Deployment/{FULLNAME}-controlplane"]["metadata"]["labels"]
    for where, pod in ray_pods(rendered):
        named = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert admitted(rules, gateway, 9000, named), where
        for name, port in RAY_PORTS.items():
            if name != "serve-grpc":
                assert not admitted(rules, gateway, port, named), f"{where}: a gateway reaches {name} ({port})"
                assert not admitted(rules, controlplane, port, named), f"{where}: the control plane reaches {name}"
        for other_where, other in ray_pods(rendered):  # Ray talks to itself on many ports
            assert admitted(rules, other["metadata"]["labels"], 6379, named), f"{other_where} -> {where}"


@profiles
def test_the_gateway_does_not_read_the_ray_dashboard(rendered_profiles: dict[str, Rendered], profile: str,
                                                     tmp_path: Path, clean_env) -> None:
    """The dashboard takes job submissions (code execution on the cluster): gateways are not let in, so the
    chart gives them no serve_status_url (a model at zero replicas answers 503 + Retry-After at once)."""
    settings = load_settings(settings_text(rendered_profiles[profile]), tmp_path)
    assert all(model.serve_status_url is None for model in settings.models)


@profiles
def test_the_ops_port_admits_the_control_plane_and_the_public_ports_anyone(
        rendered_profiles: dict[str, Rendered], profile: str) -> None:
    rendered = rendered_profiles[profile]
    rules = _gateway_policy(rendered)["ingress"]
    named = {p["name"]: p["containerPort"] for p in gateway_pod(rendered)["spec"]["containers"][0]["ports"]}
    controlplane = pods(rendered)[f"Deployment/{FULLNAME}-controlplane"]["metadata"]["labels"]
    stranger = {"app": "somebody-else"}
    for port in (8000, 50051):
        assert admitted(rules, stranger, port, named)
    assert admitted(rules, controlplane, 9401, named)
    assert not admitted(rules, stranger, 9401, named)
    assert not any("ipBlock" in peer for rule in rules for peer in rule.get("from", []))


def test_more_ops_clients_come_from_values(render) -> None:
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    rendered = render({"networkPolicy": {"gateway": {"opsFrom": [prometheus]}}})
    (ops_rule,) = [r for r in _gateway_policy(rendered)["ingress"]
                   if r.get("ports") == [{"protocol": "TCP", "port": "ops"}]]
    assert prometheus in ops_rule["from"]
    all_valid(rendered)


def test_network_policies_can_be_turned_off(render) -> None:
    assert render({"networkPolicy": {"enabled": False}}).kind("NetworkPolicy") == []


# ------------------------------------------------------------------------------------------ 11: operator port


@profiles
def test_operator_endpoints_have_their_own_port_and_service(rendered_profiles: dict[str, Rendered], profile: str,
                                                            tmp_path: Path, clean_env) -> None:
    rendered = rendered_profiles[profile]
    settings = load_settings(settings_text(rendered), tmp_path)
    assert (settings.ops_host, settings.ops_port) == ("0.0.0.0", 9401)
    pod = gateway_pod(rendered)
    (container,) = pod["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 50051, "ops": 9401}
    ops = rendered.one("Service", f"{GATEWAY}-ops")
    assert ops["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in ops["spec"]["ports"]] == [("ops", 9401, "ops")]
    for where, other in rendered.pod_templates():
        assert matches(ops["spec"]["selector"], other["metadata"]["labels"]) == (where == f"Deployment/{GATEWAY}")
    public = rendered.one("Service", GATEWAY)
    assert {p["name"] for p in public["spec"]["ports"]} == {"http", "grpc"}
    # The control plane reads every gateway pod's /herd/load on the operator port.
    headless = rendered.one("Service", f"{GATEWAY}-pods")
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("ops", 9401)]
    assert settings.controlplane.gateway_urls == [f"http://{GATEWAY}-pods.{NAMESPACE}.svc:9401"]
    # Probes: the cheap ones on the public port (/health, which asks Ray, is an operator endpoint now).
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    notes = rendered.notes
    assert f"svc/{GATEWAY}-ops" in notes and "/admin/v1" in notes


def test_the_service_monitor_scrapes_the_ops_service_not_the_public_one(render) -> None:
    rendered = render({"serviceMonitor": {"enabled": True}})
    (monitor,) = rendered.kind("ServiceMonitor")
    selected = {svc["metadata"]["name"]: svc for svc in rendered.kind("Service")
                if selects(monitor["spec"]["selector"], svc["metadata"]["labels"])}
    assert set(selected) == {f"{GATEWAY}-ops", f"{FULLNAME}-controlplane"}
    scraped = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert scraped == {"ops", "metrics"}
    for name, svc in selected.items():
        assert scraped & {p["name"] for p in svc["spec"]["ports"]}, name


# ------------------------------------------------------------------------------------------- 12: shard mTLS


SHARD_TLS = {"tls": {"shards": {"enabled": True, "secretName": "herd-shard-tls"}}}


def test_shard_tls_comes_from_a_secret_mounted_in_the_ray_pods(render) -> None:
    rendered = render(deep_merge(SHARD_TLS, {"models": {"scout": {"shard_listen": "node"}}}))
    for where, pod in ray_pods(rendered):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["shard-tls"]["secret"]["secretName"] == "herd-shard-tls", where
        (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "shard-tls"]
        assert mount == {"name": "shard-tls", "mountPath": SHARD_TLS_DIR, "readOnly": True}, where
    for where in (f"Deployment/{GATEWAY}", f"Deployment/{FULLNAME}-controlplane"):  # the key stays on Ray pods
        assert "shard-tls" not in {v["name"] for v in pods(rendered)[where]["spec"]["volumes"]}, where
    args = app_args(rendered.one("RayService", f"{FULLNAME}-scout"))
    assert args["shard_listen"] == "node"
    assert args["shard_tls"] == {"cert_file": f"{SHARD_TLS_DIR}/tls.crt", "key_file": f"{SHARD_TLS_DIR}/tls.key",
                                 "ca_file": f"{SHARD_TLS_DIR}/ca.crt"}
    all_valid(rendered)


def test_shard_tls_args_are_what_herd_serve_prints(render, tmp_path: Path, clean_env) -> None:
    """The same files named in herd's own settings (tls.shard_*) make `herd serve --print-config` print the
    chart's args: stand-in PEM files here, their paths put back to the mount before comparing."""
    from herd.platform.server import print_config

    rendered = render(deep_merge(profile_values("dev"), deep_merge(
        SHARD_TLS, {"tls": {"shards": {"serverName": "shards.herd.internal"}}})))
    raw = settings_yaml(rendered)
    (model,) = raw["models"]
    pod_path = model["path"]
    local = tmp_path / "checkpoint"
    local.mkdir()
    (local / "config.json").write_text("{}")
    model["path"] = str(local)
    files = {}
    for key, name in (("shard_cert_file", "tls.crt"), ("shard_key_file", "tls.key"), ("shard_ca_file", "ca.crt")):
        (tmp_path / name).write_text("-----BEGIN STAND-IN-----\n")
        files[key] = str(tmp_path / name)
    raw["tls"] = {**files, "shard_server_name": "shards.herd.internal"}
    printed = yaml.safe_load(print_config(load_settings(yaml.safe_dump(raw), tmp_path)))
    (app,) = printed["applications"]
    app["args"]["path"] = pod_path
    for key in ("cert_file", "key_file", "ca_file"):
        app["args"]["shard_tls"][key] = app["args"]["shard_tls"][key].replace(str(tmp_path), SHARD_TLS_DIR)
    chart = serve_config(rendered.one("RayService", f"{FULLNAME}-scout"))
    assert _typed(chart) == _typed(printed)
    assert _keys(chart) == _keys(printed)


@pytest.mark.parametrize(("values", "expected"), [
    ({"models": {"scout": {"shard_listen": "node"}}}, ["models.scout.shard_listen", "tls.shards.enabled"]),
    ({"tls": {"shards": {"enabled": True}}}, ["tls.shards.secretName"]),
])
def test_shards_on_the_network_need_tls(render, values: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in {caught.value}"


def test_without_shard_tls_nothing_is_mounted(rendered_profiles: dict[str, Rendered]) -> None:
    for rendered in rendered_profiles.values():
        for where, pod in ray_pods(rendered):
            assert "shard-tls" not in {v["name"] for v in pod["spec"]["volumes"]}, where
        for rs in rendered.kind("RayService"):
            assert "shard_tls" not in app_args(rs)
