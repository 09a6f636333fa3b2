"""The chart, loaded once with the real Helm SDK (offline), and its rendered objects."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[3] / "helm" / "herd"
RELEASE = "herd"
NAMESPACE = "llm"
PROFILES = {"defaults": None, "scout": "values-scout.yaml", "scout-mn": "values-scout-mn.yaml",
            "maverick": "values-maverick.yaml",
            "dev": "values-dev.yaml"}
"""Profile -> values file applied over values.yaml (`helm install -f ...`); `defaults` is values.yaml alone."""


def profile_values(profile: str) -> dict[str, Any]:
    """A profile's values as `-f` hands them to Helm (nulls kept: Helm deletes those keys)."""
    name = PROFILES[profile]
    return {} if name is None else helm.values_from_yaml((CHART_DIR / name).read_text())


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid over `base`, key by key (as a second `-f` or `--set` would)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Rendered:
    """Every object of one render, with the template each came from."""

    objects: list[tuple[str, dict[str, Any]]]
    notes: str

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for _, obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [obj for obj in self.kind(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in self.kind(kind)]}"
        return found[0]

    def pod_templates(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, pod template) of every Deployment and every RayService head and worker group."""
        pods = [(f"Deployment/{d['metadata']['name']}", d["spec"]["template"]) for d in self.kind("Deployment")]
        for rs in self.kind("RayService"):
            cluster = rs["spec"]["rayClusterConfig"]
            pods.append((f"RayService/{rs['metadata']['name']}/head", cluster["headGroupSpec"]["template"]))
            for group in cluster["workerGroupSpecs"]:
                pods.append((f"RayService/{rs['metadata']['name']}/{group['groupName']}", group["template"]))
        return pods


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm.Chart) -> Callable[..., Rendered]:
    """render(values, release=...) -> Rendered; raises Helm's error (schema or template) as is."""

    def _render(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> Rendered:
        manifests = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
        objects = []
        notes = ""
        for template, text in sorted(manifests.items()):
            if template.endswith("NOTES.txt"):
                notes = text
                continue
            for obj in yaml.safe_load_all(text):
                if obj:
                    objects.append((template, obj))
        return Rendered(objects, notes)

    return _render


@pytest.fixture(scope="session")
def rendered_profiles(render: Callable[..., Rendered]) -> dict[str, Rendered]:
    return {profile: render(profile_values(profile)) for profile in PROFILES}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HERD_* variables from the test run's environment leak into HerdSettings."""
    for name in list(os.environ):
        if name.startswith("HERD_"):
            monkeypatch.delenv(name)
    return monkeypatch
