"""The chart's hand-written values.schema.json and herd's pydantic settings describe the same model settings.

The chart passes a model's values through to its replicas unchanged (herd.replicaConfig), so every key the
schema lets through must be one herd reads, with the same type, choices and bounds; and every setting herd
reads must be a value of the chart. A field added on one side only fails here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from herd.platform.settings import ModelSettings
from tests.unit.helm.conftest import CHART_DIR

CHART_ONLY = {"enabled", "head", "worker"}  # the chart's own keys of a model
SET_BY_CHART = {"name", "serve_grpc_target", "serve_status_url"}  # herd settings the chart writes itself
PAIRS = [("ModelSettings", "model"), ("EngineConfig", "engine"), ("DeploymentConfig", "deployment"),
         ("ExpertBalance", "balance"), ("ServeAutoscaling", "autoscaling"), ("AutoscaleSettings", "autoscale"),
         ("SpeculativeConfig", "speculative"), ("DisaggregationSettings", "disaggregation"),
         ("PrefillAutoscaleSettings", "prefill_autoscale"), ("DecodeAutoscaleSettings", "decode_autoscale")]
BOUNDS = ("enum", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def herd_schema() -> dict[str, Any]:
    return ModelSettings.model_json_schema()


def chart_schema() -> dict[str, Any]:
    return json.loads((CHART_DIR / "values.schema.json").read_text())


def herd_object(name: str) -> dict[str, Any]:
    schema = herd_schema()
    return schema if name == "ModelSettings" else schema["$defs"][name]


def shape(prop: dict[str, Any], defs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A property's types (refs resolved, `anyOf` unfolded) and bounds, comparable across both schemas. An object
    counts as "object": its own keys are compared as a pair of their own."""
    out: dict[str, Any] = {"types": set()}
    for option in prop.get("anyOf", [prop]):
        if "$ref" in option:
            option = defs[option["$ref"].removeprefix(prefix)]
        kinds = option.get("type", "object" if "properties" in option else [])
        out["types"] |= set(kinds if isinstance(kinds, list) else [kinds])
        for bound in BOUNDS:
            if bound in option and "properties" not in option:
                out[bound] = sorted(option[bound]) if bound == "enum" else option[bound]
    return out


@pytest.mark.parametrize(("herd_name", "chart_name"), PAIRS)
def test_the_chart_schema_has_herds_settings_and_no_others(herd_name: str, chart_name: str) -> None:
    herd_keys = set(herd_object(herd_name)["properties"])
    chart_keys = set(chart_schema()["definitions"][chart_name]["properties"])
    if herd_name == "ModelSettings":
        herd_keys -= SET_BY_CHART
        chart_keys -= CHART_ONLY
    assert chart_keys == herd_keys, f"chart only: {chart_keys - herd_keys}; herd only: {herd_keys - chart_keys}"


@pytest.mark.parametrize(("herd_name", "chart_name"), PAIRS)
def test_each_setting_has_the_same_type_choices_and_bounds(herd_name: str, chart_name: str) -> None:
    herd, chart = herd_schema(), chart_schema()
    herd_props = herd_object(herd_name)["properties"]
    chart_props = chart["definitions"][chart_name]["properties"]
    for key in set(herd_props) & set(chart_props):
        ours = shape(herd_props[key], herd.get("$defs", {}), "#/$defs/")
        theirs = shape(chart_props[key], chart["definitions"], "#/definitions/")
        assert ours == theirs, f"{chart_name}.{key}: herd {ours} != chart {theirs}"


def test_a_schema_difference_is_caught() -> None:
    """The comparison can fail: a bound the chart would not enforce is seen."""
    herd = herd_schema()
    prop = dict(herd["$defs"]["EngineConfig"]["properties"]["block_size"])
    loose = {**prop, "minimum": 0}
    assert shape(prop, herd["$defs"], "#/$defs/") != shape(loose, herd["$defs"], "#/$defs/")
