"""A model's speculative decoding through the chart: off by default, passed to its replicas as written (and
read there by EngineConfig), and what herd would refuse refused by the chart's schema, naming the key."""

from __future__ import annotations

from collections.abc import Callable

import helm_python as helm
import pytest

from herd.engine import EngineConfig
from herd.engine.speculative.config import SpeculativeConfig
from tests.unit.helm.conftest import Rendered
from tests.unit.helm.test_chart import FULLNAME, app_args

WHERE = "/models/scout/engine/speculative"


def _engine(rendered: Rendered) -> dict[str, object]:
    return app_args(rendered.one("RayService", f"{FULLNAME}-scout"))["engine"]


def test_off_by_default(render: Callable[..., Rendered]) -> None:
    assert _engine(render()).get("speculative") is None


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_tokens": 4},
    {"method": "ngram", "num_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    {"method": "eagle3", "num_tokens": 3, "draft_path": "/models/Llama-4-Maverick-17B-128E-Eagle3"},
])
def test_a_models_speculative_reaches_its_replicas(render: Callable[..., Rendered], spec: dict[str, object]) -> None:
    engine = _engine(render({"models": {"scout": {"engine": {"speculative": spec}}}}))
    assert engine["speculative"] == spec
    fields = {k: v for k, v in engine.items() if k not in ("dtype", "device")}
    assert EngineConfig(**fields).speculative == SpeculativeConfig(**spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "expected"), [
    ({"num_tokens": 3}, [WHERE, "method"]),
    ({"method": "medusa"}, [f"{WHERE}/method", "ngram"]),
    ({"method": "ngram", "num_tokens": 17}, [f"{WHERE}/num_tokens", "maximum"]),
    ({"method": "ngram", "num_tokens": 0}, [f"{WHERE}/num_tokens", "minimum"]),
    ({"method": "eagle3", "num_tokens": 3}, [WHERE, "draft_path"]),
    ({"method": "ngram", "draft_path": "/models/x"}, [f"{WHERE}/draft_path", "null"]),
    ({"method": "ngram", "k": 3}, [WHERE, "k"]),
])
def test_schema_refuses_what_herd_would(render: Callable[..., Rendered], spec: dict[str, object],
                                        expected: list[str]) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"models": {"scout": {"engine": {"speculative": spec}}}})
    message = str(caught.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    with pytest.raises(ValueError):
        SpeculativeConfig(**spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "expected"), [
    ({"models": {"scout": {"engine": {"speculative": {"method": "ngram"}, "async_scheduling": True}}}},
     ["models.scout.engine.speculative", "async_scheduling"]),
    ({"modelDefaults": {"engine": {"async_scheduling": True}},
      "models": {"scout": {"engine": {"speculative": {"method": "ngram"}}}}},
     ["models.scout.engine.speculative", "async_scheduling"]),
    ({"models": {"scout": {"engine": {"speculative": {"method": "ngram", "prompt_lookup_min": 5}}}}},
     ["models.scout.engine.speculative", "prompt_lookup_min (5)", "prompt_lookup_max (4)"]),
    ({"models": {"scout": {"engine": {"speculative": {"method": "ngram", "prompt_lookup_min": 3,
                                                      "prompt_lookup_max": 2}}}}},
     ["models.scout.engine.speculative", "prompt_lookup_min (3)", "prompt_lookup_max (2)"]),
])
def test_what_the_schema_cannot_say_is_refused_by_the_chart(render: Callable[..., Rendered],
                                                           values: dict[str, object], expected: list[str]) -> None:
    """Checks across keys, on each model laid over modelDefaults (as its replicas get it)."""
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in {caught.value}"
    model = values["models"]["scout"]["engine"]  # type: ignore[index]
    engine = {**values.get("modelDefaults", {}).get("engine", {}), **model}  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        EngineConfig(**engine)


def test_speculative_beside_async_scheduling_off_renders(render: Callable[..., Rendered]) -> None:
    values = {"modelDefaults": {"engine": {"async_scheduling": True}},
              "models": {"scout": {"engine": {"async_scheduling": False, "speculative": {"method": "ngram"}}}}}
    assert _engine(render(values))["speculative"] == {"method": "ngram"}


def test_the_charts_prompt_lookup_defaults_are_herds(render: Callable[..., Rendered]) -> None:
    """The chart's check fills an unset bound with herd's default (_helpers.tpl): the two must agree."""
    low = SpeculativeConfig.model_fields["prompt_lookup_min"].default
    high = SpeculativeConfig.model_fields["prompt_lookup_max"].default
    render({"models": {"scout": {"engine": {"speculative": {"method": "ngram", "prompt_lookup_min": high}}}}})
    render({"models": {"scout": {"engine": {"speculative": {"method": "ngram", "prompt_lookup_max": low}}}}})
    assert low >= 2, "a max below the default min must still be a valid value (>= 1)"
    for spec in ({"prompt_lookup_min": high + 1}, {"prompt_lookup_max": low - 1}):
        with pytest.raises(helm.HelmError, match="prompt_lookup_min"):
            render({"models": {"scout": {"engine": {"speculative": {"method": "ngram", **spec}}}}})
