"""A CUDA emulator for Herd's kernel sources (test support, not shipped): each .cu is compiled unmodified as C++
with g++ (shim.h force-included), every CUDA thread runs as a fiber, one OS thread per block, and the runtime
checks CUDA's launch limits, barrier and warp rules as it goes. See tests/cudaemu/README.md.
"""

from tests.cudaemu.build import VARIANTS, compile_module
from tests.cudaemu.errors import EmulatorError, LaunchError
from tests.cudaemu.module import ORDERS, Module
from tests.cudaemu.sanitizers import runtime_loaded, sanitizer_env
from tests.cudaemu.signature import Param, kernel_signatures

__all__ = ["ORDERS", "VARIANTS", "EmulatorError", "LaunchError", "Module", "Param", "compile_module",
           "kernel_signatures", "runtime_loaded", "sanitizer_env"]
