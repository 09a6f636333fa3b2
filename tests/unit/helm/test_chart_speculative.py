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
