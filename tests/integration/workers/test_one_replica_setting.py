"""A replica setting is one edit in Python plus its chart value.

In a copy of the code and the chart, one field is added to EngineConfig and one value (with its schema entry) to
the chart; nothing else. The chart renders it into serveConfigV2 and herd.yaml; `herd serve --print-config`
writes it from herd.yaml; and a Ray Serve replica built from the chart's serveConfigV2 args (through
herd.platform.replica_app:build_app, as the RayService names it) hands it to its engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from herd.model.tiny import make_tiny
from tests.unit.helm.conftest import CHART_DIR, NAMESPACE, RELEASE, deep_merge, profile_values

REPO = CHART_DIR.parents[1]
FIELD = '    probe_knob: int = Field(0, ge=0, description="a setting a test adds")\n'

# Runs in a fresh interpreter on the copy: the settings file through herd serve's own serve config, then the
# chart's args through Serve; prints what each produced.
SCRIPT = """
import json, sys
from pathlib import Path
import ray
from ray import serve
from herd.platform.server import serve_config
from herd.platform.settings import HerdSettings
from herd.platform.replica_app import build_app

settings_file, args_file = sys.argv[1:3]
printed = serve_config(HerdSettings.load(Path(settings_file)))["applications"][0]["args"]
args = json.loads(Path(args_file).read_text())
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    handle = serve.run(build_app(args), name="probe", route_prefix=None)
    replica = handle.config.remote().result()
finally:
    serve.shutdown()
    ray.shutdown()
print(json.dumps({"printed": printed, "replica": replica}))
"""


def _copy_with_the_setting(root: Path) -> Path:
    """herd/ and helm/ copied, with the one Python edit and the chart value (and its schema entry)."""
    shutil.copytree(REPO / "herd", root / "herd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "helm", root / "helm")
    config = root / "herd" / "engine" / "config.py"
    text = config.read_text()
    anchor = '    device: str = Field("cpu"'
    assert anchor in text and "probe_knob" not in text
    config.write_text(text.replace(anchor, FIELD + anchor, 1))
    values = root / "helm" / "herd" / "values.yaml"
    text = values.read_text()
    anchor = "    # -- Torch device of the trunk (cpu, cuda).\n    device: cpu\n"
    assert text.count(anchor) == 1
    values.write_text(text.replace(anchor, anchor + "    # -- A setting a test adds.\n    probe_knob: 0\n"))
    schema_file = root / "helm" / "herd" / "values.schema.json"
    schema = json.loads(schema_file.read_text())
    schema["definitions"]["engine"]["properties"]["probe_knob"] = {"description": "a setting a test adds",
                                                                   "type": "integer", "minimum": 0}
    schema_file.write_text(json.dumps(schema, indent=2))
    return root


def _render(chart_dir: Path, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(serveConfigV2's args, herd.yaml) of the one model."""
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    args, settings = None, None
    for template, text in manifests.items():
        if template.endswith("NOTES.txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj and obj["kind"] == "RayService":
                (app,) = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]
                args = app["args"]
            if obj and obj["kind"] == "ConfigMap" and "herd.yaml" in obj["data"]:
                settings = yaml.safe_load(obj["data"]["herd.yaml"])
    assert args is not None and settings is not None
    return args, settings


def test_a_setting_added_in_one_place_reaches_the_chart_herd_serve_and_the_engine(tmp_path: Path) -> None:
    copy = _copy_with_the_setting(tmp_path / "repo")
    values = deep_merge(profile_values("dev"), {
        "models": {"scout": {"shards": 0, "transport": "local", "engine": {"probe_knob": 7, "kv_cache_mb": 16}}},
        "telemetry": {"replica_metrics_port": None}})
    args, settings = _render(copy / "helm" / "herd", values)
    assert args["engine"]["probe_knob"] == 7
    assert settings["models"][0]["engine"]["probe_knob"] == 7

    checkpoint = make_tiny(tmp_path / "scout", preset="scout", seed=3)
    args["path"] = settings["models"][0]["path"] = str(checkpoint)  # the pods' mount, here
    settings["models"][0]["engine"]["probe_knob"] = 5  # so the two routes are told apart
    (tmp_path / "herd.yaml").write_text(yaml.safe_dump({"models": settings["models"], "models_dir": str(tmp_path)}))
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "herd.yaml"), str(tmp_path / "args.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["printed"]["engine"]["probe_knob"] == 5, "herd serve --print-config carries it"
    assert result["replica"]["args"]["engine"]["probe_knob"] == 7
    assert result["replica"]["engine"]["probe_knob"] == 7, "the engine inside the Serve replica has it"


def test_without_the_edit_the_setting_is_refused(tmp_path: Path) -> None:
    """The other side of the proof: the unedited chart refuses the value, so the copy's edit is what carried it."""
    with helm.Chart.load(CHART_DIR) as chart:
        try:
            chart.render(deep_merge(profile_values("dev"), {"models": {"scout": {"engine": {"probe_knob": 7}}}}),
                         name=RELEASE, namespace=NAMESPACE, is_install=True)
        except Exception as err:  # Helm's schema error
            assert "probe_knob" in str(err)
        else:
            raise AssertionError("the chart's schema let an unknown engine setting through")
