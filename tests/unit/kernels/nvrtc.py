"""Compile CUDA C with NVRTC, as CuPy's RawModule does at run time, from the nvidia-cuda-nvrtc wheel."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path


def library() -> ctypes.CDLL | None:
    """libnvrtc from the installed wheel, or None where it is not installed (not Linux)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for candidate in sorted(Path(root).glob("cu*/lib/libnvrtc.so*")):
            if "builtins" not in candidate.name:
                return ctypes.CDLL(str(candidate))
    return None


def compile_source(lib: ctypes.CDLL, source: Path, options: list[str]) -> tuple[int, str]:
    """(NVRTC status, compile log) for one source file; status 0 is success."""
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(program), source.read_bytes(), str(source).encode(), 0, None, None)
    if status:
        return status, "nvrtcCreateProgram failed"
    encoded = [o.encode() for o in options]
    status = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace")
