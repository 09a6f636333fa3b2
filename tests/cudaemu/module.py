"""A compiled emulator module: launches a kernel's whole grid on the fiber runtime, after CUDA's launch checks."""

from __future__ import annotations

import ctypes
import numbers
import struct
from collections.abc import Sequence
from pathlib import Path

from tests.cudaemu.errors import EmulatorError, LaunchError
from tests.cudaemu.signature import Param

ORDERS = ("forward", "reverse", "random")
"""The order a block's runnable fibers resume in at each scheduling round (random: reshuffled every round)."""

MAX_THREADS = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_SHARED_BYTES = 48 * 1024
"""CUDA's limits for a launch without opt-ins (dynamic shared memory beyond 48 KiB needs a function attribute)."""

SCALAR_FORMATS = {
    "bool": "?", "char": "b", "signed char": "b", "unsigned char": "B", "short": "h", "unsigned short": "H",
    "int": "i", "signed": "i", "signed int": "i", "unsigned": "I", "unsigned int": "I",
    "long": "q", "long long": "q", "long long int": "q", "unsigned long": "Q", "unsigned long long": "Q",
    "unsigned long long int": "Q", "int32_t": "i", "uint32_t": "I", "int64_t": "q", "uint64_t": "Q", "size_t": "Q",
    "float": "f", "double": "d",
}
"""struct formats of the scalar parameter types a launch can pass (a pointer is an address, "Q")."""


def supported(param: Param) -> bool:
    """Whether a launch can pass `param` (a pointer, or a scalar of SCALAR_FORMATS)."""
    return param.is_pointer or param.type in SCALAR_FORMATS


class Module:
    """One compiled source: `launch` runs any of its `signatures`' kernels synchronously."""

    def __init__(self, path: Path, signatures: dict[str, list[Param]]) -> None:
        self.path = path
        self.signatures = signatures
        self._lib = ctypes.CDLL(str(path))
        self._lib.cudaemu_launch.restype = ctypes.c_int
        self._lib.cudaemu_launch.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.c_uint, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_ulong]

    def launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
               args: Sequence[int | float], *, shared_bytes: int = 0, order: str = "forward",
               seed: int = 0) -> None:
        """Run kernel `name` over the whole grid. `args` are already converted: an address for a pointer, an int
        for an integer, a float for a float. LaunchError where CUDA refuses the launch, EmulatorError where the
        kernel breaks a rule (deadlock, warp mask, barrier), TypeError for arguments that do not fit."""
        if name not in self.signatures:
            raise EmulatorError(f"no kernel {name!r} in this module; it has {sorted(self.signatures)}")
        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {ORDERS}")
        check_launch(name, grid, block, shared_bytes)
        packed = pack_args(name, self.signatures[name], args)
        entry = ctypes.cast(getattr(self._lib, f"cudaemu_entry_{name}"), ctypes.c_void_p)
        error = ctypes.create_string_buffer(2048)
        failed = self._lib.cudaemu_launch(
            entry, packed, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_bytes,
            ORDERS.index(order), seed % 2**64, error, len(error))
        if failed:
            raise EmulatorError(f"{name}: {error.value.decode(errors='replace')}")


def check_launch(name: str, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int) -> None:
    """LaunchError, naming the kernel and the limit, for a launch configuration CUDA refuses."""
    for what, dims, limits in (("grid", grid, MAX_GRID), ("block", block, MAX_BLOCK)):
        if len(dims) != 3:
            raise LaunchError(f"{name}: {what} {dims} must have 3 dimensions")
        for axis, size, limit in zip("xyz", dims, limits, strict=True):
            if not 1 <= size <= limit:
                raise LaunchError(f"{name}: {what} {axis} = {size} outside CUDA's limit 1..{limit} ({what} {dims})")
    threads = block[0] * block[1] * block[2]
    if threads > MAX_THREADS:
        raise LaunchError(f"{name}: block {block} has {threads} threads, more than CUDA's {MAX_THREADS}")
    if not 0 <= shared_bytes <= MAX_SHARED_BYTES:
        raise LaunchError(f"{name}: dynamic shared memory {shared_bytes} bytes outside CUDA's default limit "
                          f"0..{MAX_SHARED_BYTES}")


def pack_args(name: str, params: Sequence[Param], args: Sequence[int | float]) -> bytes:
    """The launch's argument slots: each argument as its parameter's C type, in 8 bytes."""
    if len(args) != len(params):
        raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
    slots = []
    for param, value in zip(params, args, strict=True):
        where = f"{name}: parameter {param.name} ({param.type})"
        if not supported(param):
            raise EmulatorError(f"{where}: the emulator cannot pass this type")
        code = "Q" if param.is_pointer else SCALAR_FORMATS[param.type]
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if code in "fd" and integral:
            value = float(value)
        if code not in "fd?" and not integral:
            raise TypeError(f"{where} takes an integer, got {type(value).__name__} {value!r}")
        try:
            slots.append(struct.pack(f"={code}", value).ljust(8, b"\0"))
        except struct.error as exc:
            raise TypeError(f"{where}: {value!r} does not fit ({exc})") from exc
    return b"".join(slots)
