"""Where the CUDA C sources of the MoE kernels live, and how every compiler is asked to build them."""

from __future__ import annotations

from pathlib import Path

CUDA_DIR = Path(__file__).with_name("cuda")
"""gating.cu, permute.cu, combine.cu, int4.cu and the header they share."""

COMPILE_OPTIONS = ("-std=c++17", f"-I{CUDA_DIR}")
"""Options common to NVRTC (CuPy) and nvcc; the target architecture is added by the caller."""


def source(name: str) -> str:
    """The text of `name`.cu."""
    return (CUDA_DIR / f"{name}.cu").read_text()
