"""The wheel is a package that serves: built from the tracked files alone (no generated gRPC code in the
tree, as in a fresh clone before `make`), it carries herd.protos' generated modules, and its imports and
`herd --version` work from it with no checkout on the path."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import herd
from tests.integration.wheel_build import build_wheel


def test_a_wheel_built_from_the_tracked_files_has_its_grpc_modules(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"herd-{herd.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("inference_pb2", "inference_pb2_grpc", "experts_pb2", "experts_pb2_grpc"):
        assert f"herd/protos/herd/v1/{module}.py" in names, module

    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    probe = ("import herd, herd.protos.herd.v1.inference_pb2_grpc as g, herd.workers.expert_shard; "
             "print(herd.__file__); print(g.InferenceStub.__name__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == [str(installed / "herd" / "__init__.py"), "InferenceStub"], out
    version = subprocess.run([sys.executable, "-m", "herd.cli", "--version"], cwd=elsewhere, env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
    assert version == f"herd {herd.__version__}"
