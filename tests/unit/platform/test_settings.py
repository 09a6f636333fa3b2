"""Settings: defaults < config file < environment < flags; bad files and values refused by name."""

from __future__ import annotations

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
    assert app["args"]["num_shards"] == 2 and app["args"]["engine"]["dtype"] == "float32"
    assert (tmp_path / "tiny-scout" / "config.json").is_file(), "presets are made on first use"
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(config)))  # what `serve deploy` accepts
    from herd.workers.serve_app import replica_config

    replica = replica_config(app["args"])
    assert replica.num_shards == 2 and replica.engine.kv_cache_bytes == 256 * 2**20
