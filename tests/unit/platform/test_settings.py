"""Settings: defaults < config file < environment < flags; bad files and values refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from herd.platform.server import serve_config
from herd.platform.settings import HerdSettings


def test_layers_override_in_order(tmp_path, monkeypatch):
    config = tmp_path / "herd.yaml"
    config.write_text(yaml.safe_dump({"http_port": 9100, "grpc_port": 9101,
                                      "models": [{"name": "m", "path": "maverick", "shards": 4}]}))
    assert HerdSettings.load().http_port == 8000
    assert HerdSettings.load(config).http_port == 9100
    monkeypatch.setenv("HERD_HTTP_PORT", "9200")
    settings = HerdSettings.load(config, grpc_port=9300)
    assert (settings.http_port, settings.grpc_port) == (9200, 9300)
    assert settings.models[0].shards == 4 and settings.models[0].engine.block_size == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [("http_port: [1", "not valid YAML"), ("- 1\n- 2", "expected a mapping"), ("http_port: -4", "http_port"),
     ("models: [{shards: 1, transport: carrier-pigeon}]", "transport"), ("surprise: 1", "surprise")],
)
def test_bad_config_files(tmp_path, text, message):
    config = tmp_path / "herd.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        HerdSettings.load(config)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HerdSettings.load(tmp_path / "nope.yaml")


def test_serve_config_names_the_app_builder_and_carries_the_replica_settings(tmp_path):
    settings = HerdSettings.load(models_dir=tmp_path, models=[{"name": "scout", "path": "scout", "shards": 2}])
    config = serve_config(settings)
    app = config["applications"][0]
    # The route prefix is what makes Serve's gRPC proxy route to the app (test_gateway_serve_grpc.py).
    assert app["import_path"] == "herd.platform.replica_app:build_app" and app["route_prefix"] == "/scout"
    assert app["args"]["shards"] == 2 and app["args"]["engine"]["dtype"] == "float32"
    assert (tmp_path / "tiny-scout" / "config.json").is_file(), "presets are made on first use"
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(config)))  # what `serve deploy` accepts
    from herd.workers.replica_config import ReplicaArgs

    replica = ReplicaArgs.model_validate(app["args"])
    assert replica.shards == 2 and replica.engine.kv_cache_bytes == 256 * 2**20


def _pem_files(directory, *names):
    """Files that look like PEM (the settings check only that they are readable PEM text)."""
    for name in names:
        (directory / name).write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return [directory / name for name in names]


def test_tls_from_a_config_file_and_the_environment(tmp_path, monkeypatch):
    cert, key, ca, shard, shard_key, shard_ca = _pem_files(tmp_path, "c.crt", "c.key", "ca.crt", "s.crt", "s.key",
                                                           "sca.crt")
    assert not HerdSettings.load().tls.public and not HerdSettings.load().tls.shards
    config = tmp_path / "herd.yaml"
    config.write_text(yaml.safe_dump({"tls": {"cert_file": str(cert), "key_file": str(key),
                                              "shard_cert_file": str(shard), "shard_key_file": str(shard_key),
                                              "shard_ca_file": str(shard_ca), "shard_server_name": "herd-shard"}}))
    monkeypatch.setenv("HERD_TLS__CLIENT_CA_FILE", str(ca))
    tls = HerdSettings.load(config).tls
    assert tls.public and tls.shards and tls.client_ca_file == ca and tls.shard_server_name == "herd-shard"


@pytest.mark.parametrize(
    ("given", "message"),
    [({"cert_file": "c.crt"}, "tls.cert_file is set but tls.key_file is not"),
     ({"key_file": "c.key"}, "tls.key_file is set but tls.cert_file is not"),
     ({"shard_cert_file": "s.crt", "shard_key_file": "s.key"}, "tls.shard_ca_file is not"),
     ({"shard_ca_file": "ca.crt"}, "tls.shard_cert_file, tls.shard_key_file is not"),
     ({"client_ca_file": "ca.crt"}, "tls.client_ca_file needs tls.cert_file"),
     ({"shard_server_name": "herd-shard"}, "tls.shard_server_name needs tls.shard_cert_file"),
     ({"cert_file": "c.crt", "key_file": "gone.key"}, "tls.key_file: cannot read .*gone.key"),
     ({"cert_file": "c.crt", "key_file": "c.key", "client_ca_file": "."}, "tls.client_ca_file: cannot read"),
     ({"shard_cert_file": "s.crt", "shard_key_file": "s.key", "shard_ca_file": "der.crt"},
      "tls.shard_ca_file: .*der.crt is not a PEM file")],
)
def test_tls_files_come_together_and_must_be_readable_pem(tmp_path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    _pem_files(tmp_path, "c.crt", "c.key", "ca.crt", "s.crt", "s.key")
    (tmp_path / "der.crt").write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError, match=message):
        HerdSettings.load(tls=given)


def test_serve_config_carries_the_shards_tls_as_absolute_paths_only_when_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _pem_files(tmp_path, "s.crt", "s.key", "ca.crt")
    models = [{"name": "scout", "path": "scout", "shards": 2}]
    plain = serve_config(HerdSettings.load(models_dir=tmp_path, models=models))
    assert "shard_tls" not in plain["applications"][0]["args"]  # the chart's serveConfigV2 has the same keys
    tls = {"shard_cert_file": "s.crt", "shard_key_file": "s.key", "shard_ca_file": "ca.crt", "shard_server_name": "x"}
    args = serve_config(HerdSettings.load(models_dir=tmp_path, models=models, tls=tls))["applications"][0]["args"]
    here = Path.cwd()
    assert args["shard_tls"] == {"cert_file": str(here / "s.crt"), "key_file": str(here / "s.key"),
                                 "ca_file": str(here / "ca.crt"), "server_name": "x"}
    from herd.workers.shard_tls import ShardTls

    assert ShardTls.model_validate(yaml.safe_load(yaml.safe_dump(args))["shard_tls"]).server_name == "x"


def test_disaggregation_in_the_serve_config_with_its_pools_scaled_by_the_control_plane(tmp_path):
    pools = {"prefill_autoscale": {"max_replicas": 2, "ttft_slo_s": 1.0},
             "decode_autoscale": {"min_replicas": 2, "max_replicas": 4, "itl_slo_s": 0.05}}
    model = {"name": "m", "path": "scout", "shards": 0, "disaggregation": {"prefill_replicas": 2, **pools}}
    settings = HerdSettings.load(models=[model], models_dir=tmp_path, controlplane={"enabled": True})
    (app,) = serve_config(settings)["applications"]
    assert app["args"]["disaggregation"] == {"decode_replicas": 1, "kv_transport": "ray", "prefill_replicas": 2}, \
        "the pools' policies are the control plane's, not the replicas'"
    decode = settings.models[0].disaggregation.decode_autoscale
    assert (decode.min_replicas, decode.max_replicas, decode.itl_slo_s, decode.kv_use_high_water) == (2, 4, 0.05, 0.9)


@pytest.mark.parametrize(("model", "message"), [
    ({"disaggregation": {"prefill_autoscale": {"min_replicas": 0}}}, "min_replicas"),
    ({"disaggregation": {"decode_autoscale": {"min_replicas": 3, "max_replicas": 2}}}, "below min_replicas"),
    ({"disaggregation": {"decode_autoscale": {"kv_use_high_water": 1.5}}}, "kv_use_high_water"),
    ({"disaggregation": {"prefill_autoscale": {"itl_slo_s": 0.1}}}, "itl_slo_s"),
    ({"disaggregation": {}, "autoscale": {"max_replicas": 4}}, "autoscale scales a colocated model"),
])
def test_pool_policies_refuse_nonsense(model, message):
    with pytest.raises(ValueError, match=message):
        HerdSettings.load(models=[{"name": "m", "path": "scout", "shards": 0, **model}], controlplane={"enabled": True})


def test_a_model_named_as_another_models_pool_is_refused_with_the_control_plane():
    models = [{"name": "m", "path": "scout", "shards": 0, "disaggregation": {}},
              {"name": "m-decode", "path": "scout", "shards": 0}]
    HerdSettings.load(models=models)  # separate Serve applications: fine without the control plane
    with pytest.raises(ValueError, match=r"models \['m-decode'\]: named as a pool of model\(s\) \['m'\]"):
        HerdSettings.load(models=models, controlplane={"enabled": True})
