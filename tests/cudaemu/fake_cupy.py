"""A stand-in `cupy` module: herd.kernels.cupy_moe runs unchanged on CPU tensors, its kernels on the emulator.

Put it in place with `sys.modules["cupy"] = fake_cupy` (a test fixture does, and puts the real one back after).
It has what Herd's CuPy backend touches: `RawModule(code=, options=)` compiles the source with
tests.cudaemu.compile_module, `.get_function(name)` gives a `RawKernel`, and calling that launches the whole grid
on the emulator before returning; `from_dlpack(tensor)` gives an `ndarray` over the tensor's memory (kept
alive); `cuda.Device(i)` and `cuda.ExternalStream(ptr, i)` are context managers.

What it checks that CuPy does not (each a bug on a GPU that shows only as wrong numbers or a crash):
- every launch argument against the kernel's C signature: a scalar must be the numpy type of its C type
  exactly (np.int32 for int, np.int64 for long long, np.float32 for float: CuPy packs a scalar by its own type,
  not the parameter's), an array's elements the pointee's size and kind (bfloat16 travels as int16 bits for
  `unsigned short`; signedness may differ, width and int/float may not), the argument count the kernel's;
- an array argument must be C-contiguous (the kernels index raw memory, strides are lost);
- a launch must be inside `cuda.ExternalStream` (else it runs on CuPy's stream, unordered with torch's work).
A broken rule raises TypeError (or ValueError for the last two) naming the kernel and the parameter.

Fibers resume in the order `launch_order(order, seed)` says (forward by default); `use_variant("asan")`
picks the sanitizer build (the process must have been started with its runtime preloaded, tests.cudaemu says).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tests.cudaemu import ORDERS, VARIANTS, Module, Param, compile_module

_NUMPY_OF_TORCH = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
    torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.bool: np.bool_,
}
_NUMPY_OF_TORCH.update({t: n for t, n in ((getattr(torch, "uint16", None), np.uint16),
                                          (getattr(torch, "uint32", None), np.uint32),
                                          (getattr(torch, "uint64", None), np.uint64)) if t is not None})

C_TYPES: dict[str, type[np.generic]] = {
    "float": np.float32, "double": np.float64, "bool": np.bool_,
    "char": np.int8, "signed char": np.int8, "unsigned char": np.uint8,
    "short": np.int16, "unsigned short": np.uint16, "int": np.int32, "unsigned int": np.uint32,
    "long long": np.int64, "unsigned long long": np.uint64,
    "signed": np.int32, "signed int": np.int32, "unsigned": np.uint32, "int32_t": np.int32, "uint32_t": np.uint32,
    "long": np.int64, "unsigned long": np.uint64, "long long int": np.int64, "unsigned long long int": np.uint64,
    "int64_t": np.int64, "uint64_t": np.uint64, "size_t": np.uint64,
}
"""The numpy scalar type CuPy packs as each C type."""


@dataclass
class _Settings:
    order: str = "forward"
    seed: int = 0
    variant: str = "plain"
    launches: int = 0  # launches so far under this seed: each gets its own random order, reproducibly
    log: list[Launch] | None = None


_settings = _Settings()


@dataclass(frozen=True)
class Launch:
    """One kernel launch, as recorded by `record_launches`."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int


@contextmanager
def launch_order(order: str, seed: int = 0) -> Iterator[None]:
    """Inside it, every launch resumes its fibers in `order` (one of ORDERS; random is seeded by `seed`)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    saved = (_settings.order, _settings.seed, _settings.launches)
    _settings.order, _settings.seed, _settings.launches = order, seed, 0
    try:
        yield
    finally:
        _settings.order, _settings.seed, _settings.launches = saved


@contextmanager
def use_variant(variant: str) -> Iterator[None]:
    """Inside it, modules are built and run as `variant` (one of VARIANTS)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    saved, _settings.variant = _settings.variant, variant
    try:
        yield
    finally:
        _settings.variant = saved


@contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside it, each launch is appended to the list it gives (before it runs, so a refused one is there too)."""
    saved, _settings.log = _settings.log, []
    try:
        yield _settings.log
    finally:
        _settings.log = saved


@dataclass(frozen=True)
class _Memory:
    ptr: int


class ndarray:  # CuPy's name, lower case
    """Device memory as CuPy sees it: here a CPU tensor's, which this object keeps alive."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _NUMPY_OF_TORCH:
            raise TypeError(f"CuPy has no dtype for {tensor.dtype} (bfloat16 crosses as int16 bits)")
        self._tensor = tensor
        self.dtype: np.dtype[Any] = np.dtype(_NUMPY_OF_TORCH[tensor.dtype])
        self.shape = tuple(tensor.shape)
        self.size = tensor.numel()
        self.data = _Memory(tensor.data_ptr())

    @property
    def c_contiguous(self) -> bool:
        return self._tensor.is_contiguous()

    def __repr__(self) -> str:
        return f"fake cupy.ndarray({self.dtype}, shape={self.shape})"


def from_dlpack(tensor: torch.Tensor) -> ndarray:
    """The tensor's memory as an ndarray, not copied (the fake device is the CPU)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"from_dlpack takes a torch.Tensor here, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"the fake device is the CPU: got a tensor on {tensor.device}")
    return ndarray(tensor)


class _Device:
    """cupy.cuda.Device: a context manager selecting a device (only one here)."""

    def __init__(self, device: int | None = None) -> None:
        self.id = 0 if device is None else int(device)

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _ExternalStream:
    """cupy.cuda.ExternalStream: launches inside it run on the stream `ptr` (torch's); nesting counted."""

    depth = 0

    def __init__(self, ptr: int, device_id: int = -1) -> None:
        self.ptr = int(ptr)
        self.device_id = device_id

    def __enter__(self) -> _ExternalStream:
        _ExternalStream.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        _ExternalStream.depth -= 1


cuda = types.SimpleNamespace(Device=_Device, ExternalStream=_ExternalStream)
"""cupy.cuda: Device and ExternalStream."""


@dataclass
class RawModule:
    """A compiled CUDA source; built for each variant on first use (the same source object serves them all)."""

    code: str
    options: Sequence[str] = ()
    _built: dict[str, Module] = field(default_factory=dict, repr=False)

    def module(self) -> Module:
        """The emulator module for the current variant."""
        variant = _settings.variant
        if variant not in self._built:
            self._built[variant] = compile_module(self.code, tuple(self.options), variant=variant)
        return self._built[variant]

    def get_function(self, name: str) -> RawKernel:
        signatures = self.module().signatures
        if name not in signatures:
            raise ValueError(f"no extern \"C\" __global__ kernel {name!r} in this module; it has {sorted(signatures)}")
        return RawKernel(self, name)


class RawKernel:
    """One kernel of a RawModule; calling it type-checks the arguments and runs the whole grid."""

    def __init__(self, module: RawModule, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], *, shared_mem: int = 0) -> None:
        built = self.module.module()
        values = check_args(self.name, built.signatures[self.name], args)
        dims = (_dims(self.name, "grid", grid), _dims(self.name, "block", block))
        if _ExternalStream.depth == 0:
            raise ValueError(f"{self.name} launched outside cupy.cuda.ExternalStream: it would run on CuPy's "
                             "stream, not torch's, unordered with the work around it")
        if _settings.log is not None:
            _settings.log.append(Launch(self.name, *dims, int(shared_mem)))
        seed = _settings.seed + _settings.launches
        _settings.launches += 1
        built.launch(self.name, *dims, values, shared_bytes=int(shared_mem), order=_settings.order, seed=seed)


def check_args(kernel: str, params: Sequence[Param], args: Sequence[Any]) -> list[int | float]:
    """The launch arguments as Module.launch takes them (addresses, ints, floats), each checked against its
    parameter's C type; TypeError naming the kernel and the parameter otherwise."""
    if not isinstance(args, tuple):
        raise TypeError(f"{kernel}: kernel arguments must be a tuple, got {type(args).__name__}")
    if len(args) != len(params):
        names = ", ".join(f"{p.type} {p.name}" for p in params)
        raise TypeError(f"{kernel} takes {len(params)} arguments ({names}), got {len(args)}")
    return [_check_arg(kernel, param, arg) for param, arg in zip(params, args, strict=True)]


def _check_arg(kernel: str, param: Param, arg: Any) -> int | float:
    where = f"{kernel}: parameter {param.name} ({param.type})"
    if param.is_pointer:
        if not isinstance(arg, ndarray):
            raise TypeError(f"{where} takes an array, got {type(arg).__name__} {arg!r}")
        pointee = np.dtype(C_TYPES[param.element]) if param.element in C_TYPES else None
        if pointee is None or not _same_storage(arg.dtype, pointee):
            raise TypeError(f"{where} points to {param.element}, got an array of {arg.dtype}")
        if not arg.c_contiguous:
            raise ValueError(f"{where} got a non-contiguous array {arg.shape}: the kernel would ignore its strides")
        return arg.data.ptr
    expected = C_TYPES.get(param.element)
    if expected is None:
        raise TypeError(f"{where}: no CuPy scalar type for {param.element!r}")
    if type(arg) is not expected:
        raise TypeError(f"{where} takes {expected.__name__}, got {type(arg).__name__} {arg!r}")
    return float(arg) if param.element in ("float", "double") else int(arg)


def _same_storage(dtype: np.dtype[Any], pointee: np.dtype[Any]) -> bool:
    """Elements the kernel can read as `pointee`: the same width and kind (integer or float); signedness free."""
    def kind(d: np.dtype[Any]) -> str:
        return "i" if d.kind in "iu" else d.kind
    return dtype.itemsize == pointee.itemsize and kind(dtype) == kind(pointee)


def _dims(kernel: str, what: str, dims: Sequence[int]) -> tuple[int, int, int]:
    if not isinstance(dims, tuple) or not 1 <= len(dims) <= 3 or not all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"{kernel}: {what} must be a tuple of 1 to 3 ints, got {dims!r}")
    x, y, z = (*(int(d) for d in dims), 1, 1)[:3]
    return x, y, z
