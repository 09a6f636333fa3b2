"""The CPU image, built by `make image`'s script, and podman as these machines run it: shared by the image tests.

A test module takes the fixture by importing `build_image` (it is the `image` fixture)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import herd

ROOT = Path(__file__).resolve().parents[2]
IMAGE = f"localhost/herd:{herd.__version__}-cpu"
# root in a VM whose cgroup layout crun refuses: runc, and containers/podman.conf (see ../shared/CONTAINERS.md).
PODMAN = ["podman", "--runtime", "runc"]


def podman_env() -> dict[str, str]:
    conf = os.environ.get("CONTAINERS_CONF", str(ROOT / "containers" / "podman.conf"))
    return {**os.environ, "CONTAINERS_CONF": conf}


def podman(*args: str, check: bool = True, timeout_s: float = 120,
           input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], env=podman_env(), check=check, capture_output=True, text=True,
                          timeout=timeout_s, input=input_text)


@pytest.fixture(scope="module", name="image")
def build_image() -> str:
    """The CPU image's name, built (from cache when nothing changed) by containers/build.sh."""
    missing = [tool for tool in ("buildah", "podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the image tests need {', '.join(missing)} "
                    "(Debian: apt-get install buildah podman runc debootstrap)")
    start = time.monotonic()
    build = subprocess.run(["bash", "containers/build.sh"], cwd=ROOT,
                           env={**podman_env(), "FLAVOR": "cpu", "IMAGE": IMAGE},
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    size_bytes = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout)
    print(f"\nimage {IMAGE}: built in {time.monotonic() - start:.0f} s, {size_bytes / 1e9:.2f} GB")
    return IMAGE
