"""A model's prefill/decode disaggregation through the chart: off by default, passed to its replicas as `herd serve
--print-config` writes it, its pools' policies to the control plane alone, and what herd refuses refused by the chart
(its schema, or its checks across keys)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from herd.platform.settings import ModelSettings
from herd.workers.replica_config import ReplicaArgs
from tests.unit.helm.conftest import Rendered, deep_merge, profile_values
from tests.unit.helm.test_chart import FULLNAME, app_args, load_settings, settings_text

ON = {"prefill_replicas": 2, "decode_replicas": 3, "kv_transport": "ray"}
OFF_CONTROLPLANE = {"controlplane": {"enabled": False}}


def _args(rendered: Rendered) -> dict[str, Any]:
    return app_args(rendered.one("RayService", f"{FULLNAME}-scout"))


def test_off_by_default(render: Callable[..., Rendered]) -> None:
    assert _args(render()).get("disaggregation") is None


def test_it_reaches_the_replicas_as_herd_serve_prints_it(render: Callable[..., Rendered], tmp_path: Path,
                                                         clean_env) -> None:
    from herd.platform.server import print_config

    rendered = render(deep_merge(profile_values("dev"),
                                 {**OFF_CONTROLPLANE, "models": {"scout": {"disaggregation": ON}}}))
    args = _args(rendered)
    assert args["disaggregation"] == ON
    assert ReplicaArgs.model_validate(args).disaggregation is not None
    raw = yaml.safe_load(settings_text(rendered))
    for model in raw["models"]:
        model["path"] = "scout"  # a preset: herd serve makes it in models_dir
    raw["models_dir"] = str(tmp_path)
    (printed,) = [a for a in yaml.safe_load(print_config(load_settings(yaml.safe_dump(raw), tmp_path)))["applications"]
                  if a["name"] == "scout"]
    assert printed["args"]["disaggregation"] == args["disaggregation"]


@pytest.mark.parametrize(("value", "expected"), [
    ({"prefill_replicas": 0}, ["disaggregation/prefill_replicas", "minimum"]),
    ({"prefill_autoscale": {"min_replicas": 0}}, ["prefill_autoscale/min_replicas", "minimum"]),
    ({"decode_autoscale": {"kv_use_high_water": 2}}, ["decode_autoscale/kv_use_high_water", "maximum"]),
    ({"prefill_autoscale": {"itl_slo_s": 0.1}}, ["prefill_autoscale", "itl_slo_s"]),
    ({"kv_transport": "nixl"}, ["disaggregation/kv_transport"]),
    ({"pools": 2}, ["disaggregation", "pools"]),
])
def test_the_schema_refuses_what_herd_would(render: Callable[..., Rendered], value: dict[str, Any],
                                            expected: list[str]) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({**OFF_CONTROLPLANE, "models": {"scout": {"disaggregation": value}}})
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in {caught.value}"
    with pytest.raises(ValueError):
        ModelSettings.model_validate({"disaggregation": value})


def test_with_the_control_plane_the_pools_policies_go_to_it_and_not_to_the_replicas(
        render: Callable[..., Rendered], tmp_path: Path, clean_env) -> None:
    pools = {"prefill_autoscale": {"min_replicas": 1, "max_replicas": 2, "ttft_slo_s": 1.5},
             "decode_autoscale": {"min_replicas": 2, "max_replicas": 6, "itl_slo_s": 0.05}}
    rendered = render({"models": {"scout": {"disaggregation": {**ON, **pools}}}})
    assert _args(rendered)["disaggregation"] == ON, "the replicas read no policy"
    raw = yaml.safe_load(settings_text(rendered))
    (scout,) = [m for m in raw["models"] if m["name"] == "scout"]
    assert "autoscale" not in scout, "a disaggregated model's pools scale within their own policies"
    settings = load_settings(settings_text(rendered), tmp_path)
    assert settings.controlplane.rayservices["scout"] == f"{FULLNAME}-scout"
    from herd.platform.controlplane.app import units

    policies = {name: policy for name, (_, policy) in units(settings).items()}
    assert (policies["scout-prefill"].max_replicas, policies["scout-prefill"].ttft_slo_s) == (2, 1.5)
    assert (policies["scout-decode"].min_replicas, policies["scout-decode"].itl_slo_s) == (2, 0.05)
    assert policies["scout-decode"].ttft_slo_s is None
    from herd.platform.server import print_config

    for model in raw["models"]:
        model["path"] = "scout"  # a preset: herd serve makes it in models_dir
    raw["models_dir"] = str(tmp_path)
    (printed,) = [a for a in yaml.safe_load(print_config(load_settings(yaml.safe_dump(raw), tmp_path)))["applications"]
                  if a["name"] == "scout"]
    assert printed["args"]["disaggregation"] == ON, "herd serve --print-config leaves the policies out too"


@pytest.mark.parametrize(("values", "expected"), [
    ({**OFF_CONTROLPLANE, "models": {"scout": {"disaggregation": ON, "deployment": {"autoscaling": {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}}}}}, "deployment.autoscaling"),
    ({"models": {"scout": {"disaggregation": {**ON, "decode_autoscale": {"min_replicas": 3, "max_replicas": 2}}}}},
     "decode_autoscale: max_replicas (2) is below min_replicas (3)"),
    ({**OFF_CONTROLPLANE, "models": {"scout": {"disaggregation": ON, "engine": {"enable_prefix_caching": False}}}},
     "enable_prefix_caching"),
])
def test_what_cannot_run_together_is_refused(render: Callable[..., Rendered], values: dict[str, Any],
                                             expected: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert "models.scout.disaggregation" in str(caught.value) and expected in str(caught.value)
