"""The build's one step beyond pyproject.toml: herd.protos' gRPC modules are generated from protos/ into the
wheel (they are not in git, so `pip wheel .` without it gave a package that could not serve)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    """build_py, then protoc into the build directory (an editable install has them from `make protos`)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        spec = importlib.util.spec_from_file_location("herd_generate_protos", ROOT / "protos" / "generate.py")
        assert spec is not None and spec.loader is not None
        generator = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generator)
        if generator.main(Path(self.build_lib) / "herd" / "protos") != 0:
            raise SystemExit("protoc failed: the gRPC modules could not be generated")


setup(cmdclass={"build_py": BuildPyWithProtos})
