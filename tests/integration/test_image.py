"""The container image, built and run here (opt-in: `make image-test`; needs buildah, podman, runc and debootstrap).

`make image`'s script builds the CPU image from the Containerfile (on a Debian base bootstrapped here when there is
no registry), then the image is checked as the chart runs it: uid 1000, a read-only root filesystem with /tmp and
the state directory writable, bash, herd and Ray on the PATH of a login shell (KubeRay's `bash -lc`), no compiler;
`herd serve --no-auth` inside it answers `/v1/models` and a chat from the host, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import herd
from bench.common import free_port
from tests.integration.image_fixtures import IMAGE, ROOT, build_image, podman  # noqa: F401 (the image fixture)

pytestmark = pytest.mark.image


def _in_image(script: str, *options: str) -> str:
    """`script` run by a login bash in the image as the chart runs it: read-only root, default user, no network."""
    return podman("run", "--rm", "--read-only", "--network", "none", *options, IMAGE, "bash", "-lc", script).stdout


def test_the_image_is_labelled_and_runs_as_uid_1000_without_compilers(image: str) -> None:
    labels = json.loads(podman("image", "inspect", image, "--format", "{{json .Labels}}").stdout)
    assert labels["org.opencontainers.image.version"] == herd.__version__
    assert labels["org.opencontainers.image.title"] == "herd"
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == revision

    out = _in_image("id -u; id -g; command -v herd ray python3; herd --version; command -v wget bash; "
                    "for c in gcc cc c++ g++ clang make; do command -v $c || true; done; "
                    "touch /opt/herd/x 2>/dev/null && echo root-writable || echo root-read-only").split("\n")
    assert out[:2] == ["1000", "1000"], out
    # A login shell (/etc/profile resets PATH) still finds the venv's commands first.
    assert out[2:5] == ["/opt/herd/bin/herd", "/opt/herd/bin/ray", "/opt/herd/bin/python3"], out
    assert out[5] == f"herd {herd.__version__}"
    assert out[6:8] == ["/usr/bin/wget", "/usr/bin/bash"], out  # KubeRay: `bash -lc`, probes with wget
    assert out[8:] == ["root-read-only", ""], f"compilers or a writable root in the image: {out[8:]}"


def test_the_generated_grpc_modules_and_the_kernel_sources_are_in_the_image(image: str) -> None:
    probe = ("import herd.protos.herd.v1.inference_pb2_grpc, herd.protos.herd.v1.experts_pb2_grpc, importlib.resources "
             "as r; print(sum(p.name.endswith('.cu') for p in r.files('herd.kernels').joinpath('cuda').iterdir()))")
    assert int(_in_image(f'python3 -c "{probe}"')) > 0


@pytest.fixture
def served(image: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`herd serve --no-auth` in the image, read-only, as uid 1000, its state directory a host directory owned by
    1000 (the chart's emptyDir with fsGroup 1000); host networking, ports chosen here."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 1000, 1000)
    http_port, grpc_port, ops_port = free_port(), free_port(), free_port()
    name = f"herd-image-test-{http_port}"
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--user", "1000:1000",
            "--volume", f"{state}:/var/lib/herd", "--env", f"HERD_OPS_PORT={ops_port}", image,
            "herd", "serve", "--no-auth", "--http-port", str(http_port), "--grpc-port", str(grpc_port))
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if podman("inspect", name, "--format", "{{.State.Running}}").stdout.strip() != "true":
                pytest.fail("herd serve exited in the container:\n" + podman("logs", name).stderr[-4000:])
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            pytest.fail("herd serve in the container was not ready in 300 s:\n" + podman("logs", name).stderr[-4000:])
        yield base, name
    finally:
        podman("stop", "--time", "60", name, check=False, timeout_s=120)
        logs = podman("logs", name, check=False)
        exit_code = podman("inspect", name, "--format", "{{.State.ExitCode}}", check=False).stdout.strip()
        podman("rm", "--force", name, check=False)
    assert exit_code == "0", f"herd serve exited with {exit_code} on SIGTERM:\n{logs.stderr[-4000:]}"
    assert "herd.serve [ ] stopped" in logs.stderr + logs.stdout


def test_herd_serve_in_the_image_answers_the_host(served: tuple[str, str]) -> None:
    base, _ = served
    models = httpx.get(f"{base}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["scout"]
    assert models["data"][0]["root"].startswith("/var/lib/herd/")  # the tiny model, made in the state volume
    reply = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "scout", "messages": [{"role": "user", "content": "Hello from the host"}], "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8
