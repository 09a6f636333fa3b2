"""Every CUDA source compiles for sm_80 and sm_90, with nvcc and with NVRTC (what CuPy uses at run time)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from herd.kernels.cuda_sources import COMPILE_OPTIONS, CUDA_DIR
from tests.unit.kernels import nvrtc

SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHES = ["sm_80", "sm_90"]
NVCC = shutil.which("nvcc")
NVRTC = nvrtc.library()


def test_the_kernels_are_all_here():
    assert {s.stem for s in SOURCES} == {"gating", "permute", "combine", "int4"}


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit); NVRTC below still compiles every source")
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_with_nvcc(tmp_path, source, arch):
    result = subprocess.run(
        [NVCC, "-cubin", f"-arch={arch}", *COMPILE_OPTIONS, "-Werror", "all-warnings",
         "-o", str(tmp_path / "out.cubin"), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.cubin").stat().st_size > 0


@pytest.mark.skipif(NVRTC is None, reason="needs NVRTC (the nvidia-cuda-nvrtc wheel, Linux only)")
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_with_nvrtc(source, arch):
    status, log = nvrtc.compile_source(NVRTC, source, [f"--gpu-architecture={arch}", *COMPILE_OPTIONS])
    assert status == 0, log
    assert "warning" not in log, log
