"""The chart runs the image `make image` builds: `herd:<herd.__version__>-<flavour>`, cuda for the GPU profiles
and cpu for the dev profile, in every container (gateway, control plane, Ray head and workers, the tiny-checkpoint
init containers, KubeRay's autoscaler sidecar); and it refuses a CUDA trunk on the CPU image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import helm_python as helm
import pytest
import yaml

import herd
from tests.unit.helm.conftest import CHART_DIR, PROFILES, Rendered, deep_merge, profile_values

FLAVORS = {"defaults": "cuda", "scout": "cuda", "scout-mn": "cuda", "maverick": "cuda", "dev": "cpu"}
"""The image flavour each profile runs: CUDA torch + herd[gpu] for the GPU profiles, CPU for the dev one."""


def images(rendered: Rendered) -> dict[str, tuple[str, str]]:
    """(image, pull policy) of every container the release starts, by where it is."""
    found: dict[str, tuple[str, str]] = {}
    for where, pod in rendered.pod_templates():
        spec = pod["spec"]
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            found[f"{where}/{container['name']}"] = (container["image"], container.get("imagePullPolicy", ""))
    for rs in rendered.kind("RayService"):
        autoscaler = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]
        found[f"RayService/{rs['metadata']['name']}/autoscaler"] = (autoscaler.get("image", ""),
                                                                    autoscaler.get("imagePullPolicy", ""))
    return found


def test_chart_app_version_is_herds_version() -> None:
    """`make image` tags herd.__version__; the chart's default tag is its appVersion: the two must agree."""
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == herd.__version__


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_container_runs_the_profiles_flavour_of_the_image(rendered_profiles: dict[str, Rendered],
                                                                profile: str) -> None:
    found = images(rendered_profiles[profile])
    expected = (f"herd:{herd.__version__}-{FLAVORS[profile]}", "IfNotPresent")
    kinds = {where.split("/")[0] for where in found}
    assert {"Deployment", "RayService"} <= kinds
    assert any(where.endswith("/autoscaler") for where in found)
    if profile == "dev":  # the tiny checkpoints are made by init containers of the gateway and the Ray pods
        assert any("/make-tiny-" in where for where in found)
    assert {where: image for where, image in found.items() if image != expected} == {}


def test_an_explicit_tag_and_repository_are_used_as_they_are(render: Callable[..., Rendered]) -> None:
    over = {"image": {"repository": "registry.example.com/ml/herd", "tag": "0.1.0-cuda-20261203",
                      "pullPolicy": "Always"}}
    for profile in ("defaults", "dev"):
        found = images(render(deep_merge(profile_values(profile), over)))
        assert set(found.values()) == {("registry.example.com/ml/herd:0.1.0-cuda-20261203", "Always")}, profile


def test_a_profile_may_set_the_flavour(render: Callable[..., Rendered]) -> None:
    """A GPU profile on a cpu image is refused below; the dev profile on the cuda image runs (CUDA torch does CPU)."""
    found = images(render(deep_merge(profile_values("dev"), {"image": {"flavor": "cuda"}})))
    assert {image for image, _ in found.values()} == {f"herd:{herd.__version__}-cuda"}


def _version_labels(rendered: Rendered) -> set[str]:
    labels = {obj["metadata"]["labels"]["app.kubernetes.io/version"] for _, obj in rendered.objects}
    labels |= {pod["metadata"]["labels"]["app.kubernetes.io/version"] for _, pod in rendered.pod_templates()}
    return labels


@pytest.mark.parametrize("profile", list(PROFILES))
def test_version_label_is_herds_version_not_the_flavoured_tag(rendered_profiles: dict[str, Rendered],
                                                              profile: str) -> None:
    """app.kubernetes.io/version names the version of Herd, the same for both flavours of one release."""
    assert _version_labels(rendered_profiles[profile]) == {herd.__version__}


def test_version_label_follows_an_explicit_tag(render: Callable[..., Rendered]) -> None:
    """An explicit image.tag is what the user says runs (a newer release, a build of a commit): the label says so."""
    assert _version_labels(render({"image": {"tag": "0.2.0-cuda"}})) == {"0.2.0-cuda"}


CUDA_ON_CPU_IMAGE: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "a GPU profile on the cpu image": ("scout", {"image": {"flavor": "cpu"}},
                                       ["models.scout.engine.device", "cuda", "image.flavor", "cpu"]),
    "Maverick on the cpu image": ("maverick", {"image": {"flavor": "cpu"}},
                                  ["models.maverick.engine.device", "image.flavor"]),
    "a numbered CUDA device on the cpu image": ("dev", {"models": {"scout": {"engine": {"device": "cuda:0"}}}},
                                                ["models.scout.engine.device", "cuda:0", "image.flavor"]),
}


@pytest.mark.parametrize("case", list(CUDA_ON_CPU_IMAGE))
def test_a_cuda_trunk_on_the_cpu_image_is_refused(render: Callable[..., Rendered], case: str) -> None:
    profile, over, expected = CUDA_ON_CPU_IMAGE[case]
    with pytest.raises(helm.HelmError) as caught:
        render(deep_merge(profile_values(profile), over))
    for text in expected:
        assert text in str(caught.value), f"{case}: {text!r} not in {caught.value}"


def test_a_disabled_cuda_model_does_not_stop_a_cpu_release(render: Callable[..., Rendered]) -> None:
    """values.yaml's Scout is CUDA; the dev profile's Scout overrides it, and a disabled model is not checked."""
    values = deep_merge(profile_values("dev"), {"models": {"big": {"enabled": False, "path": "x",
                                                                   "engine": {"device": "cuda"}}}})
    assert {image for image, _ in images(render(values)).values()} == {f"herd:{herd.__version__}-cpu"}


def test_schema_allows_only_the_two_flavours(render: Callable[..., Rendered]) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"image": {"flavor": "rocm"}})
    assert "/image/flavor" in str(caught.value)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_notes_name_the_image(rendered_profiles: dict[str, Rendered], profile: str) -> None:
    assert f"herd:{herd.__version__}-{FLAVORS[profile]}" in rendered_profiles[profile].notes
