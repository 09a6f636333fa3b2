"""A guard that counts (or refuses) host syncs: calls that make the host wait for values a device computes.

A sync inside a step's forward stalls the host until the GPU has caught up, so it can queue nothing ahead of
the device (issue 20: a decode step's forward must have none; the sampled ids are the step's one copy).

`HostSyncGuard` is a torch.overrides.TorchFunctionMode: it sees every torch call made from Python inside it
and records the ones that sync on a GPU. On the CPU nothing really syncs, so there it is a proxy for what
the same code would do on CUDA. It records:
- reads of values on the host: Tensor.item, tolist, numpy, __array__, __bool__, __int__, __float__,
  __index__, __complex__, __contains__, __repr__, __str__, __format__, torch.equal, allclose, is_nonzero;
- ops whose output size depends on values: nonzero, argwhere, unique, unique_consecutive, masked_select,
  where(condition), repeat_interleave with tensor repeats and no output_size, bincount (CUDA reads the
  input's max to size the output), and indexing with a boolean mask (__getitem__, __setitem__, index,
  index_put, index_put_);
- copies to the host from another device (cpu, to, copy_), blocking copies from the host to another device
  (to, cuda, copy_ without non_blocking; torch.tensor or as_tensor with a device). These need two devices,
  so they show only where there is one (CUDA, or the meta device in tests).
On CUDA (`cuda=True`, the default where CUDA is available) it also enters torch.cuda.set_sync_debug_mode
("warn", each warning recorded; "error" when strict), which sees the synchronizing CUDA calls in torch's C++
too: syncs inside ops, and the ones listed above.

`forward_syncs(module)` puts each call of a module's forward in its own guard (a test, gpu-check).

Threads: the function mode sees only the thread that entered the guard; torch's CUDA debug mode is one setting
for the process, so on CUDA another thread's syncs during the guard count too (and raise, when strict).

What it does not see: syncs inside a torch op's C++ that the list does not name (histc with min == max,
for one) on the CPU proxy; calls made from C++ or CuPy rather than Python (CuPy's own syncs are not in
the CUDA debug mode either); an explicit torch.cuda.synchronize() except through the CUDA debug mode.

Host data is not a sync: a tensor made on the CPU (token ids the caller passes) stays on the host on a GPU
machine, so reading it costs nothing there. Code that reads such a tensor says so with `host_side()`,
and the guard does not count reads inside it (the CUDA debug mode still sees any device sync there).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_READS = frozenset({
    "item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__", "__index__", "__complex__",
    "__contains__", "__repr__", "__str__", "__format__", "equal", "allclose", "is_nonzero",
})
_SIZED_BY_VALUES = frozenset({
    "nonzero", "argwhere", "unique", "unique_consecutive", "_unique", "_unique2", "masked_select", "bincount",
})
_INDEXING = frozenset({"__getitem__", "__setitem__", "index", "index_put", "index_put_"})
_CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"
_TORCH_DIR = os.path.dirname(torch.__file__)

_host_side: ContextVar[int] = ContextVar("herd_host_side", default=0)


class HostSyncError(RuntimeError):
    """A host sync inside a strict HostSyncGuard (raised before the call runs)."""


@contextmanager
def host_side() -> Iterator[None]:
    """Inside it, a HostSyncGuard does not count reads: the code reads tensors that live on the host."""
    token = _host_side.set(_host_side.get() + 1)
    try:
        yield
    finally:
        _host_side.reset(token)


@contextmanager
def forward_syncs(module: torch.nn.Module, *, cuda: bool | None = None) -> Iterator[list[list[str]]]:
    """Inside it, each call of `module.forward` runs in its own HostSyncGuard; yields the syncs of every call, in
    order (so a test or gpu-check can assert a model's forward has none while the engine around it runs)."""
    forward = module.forward
    own = module.__dict__.get("forward")  # an instance's own forward (another wrapper) goes back after
    per_call: list[list[str]] = []

    def guarded(*args: Any, **kwargs: Any) -> Any:
        with HostSyncGuard(cuda=cuda) as guard:
            out = forward(*args, **kwargs)
        per_call.append(guard.syncs)
        return out

    module.forward = guarded  # this instance's, until the block ends
    try:
        yield per_call
    finally:
        if own is None:
            del module.forward  # the class's forward again
        else:
            module.forward = own


class HostSyncGuard(TorchFunctionMode):
    """`with HostSyncGuard() as guard: ...`; then `guard.syncs` lists each sync as 'what (file:line)'.

    strict: raise HostSyncError at the first sync instead (on CUDA, torch raises RuntimeError at syncs
    that only its debug mode sees). cuda: also enter torch's CUDA sync debug mode (default: where CUDA
    is available).
    """

    def __init__(self, *, strict: bool = False, cuda: bool | None = None) -> None:
        super().__init__()
        self.strict = strict
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.syncs: list[str] = []
        self._cuda_mode = 0
        self._caught: warnings.catch_warnings[list[warnings.WarningMessage]] | None = None
        self._warnings: list[warnings.WarningMessage] = []

    @property
    def count(self) -> int:
        """How many syncs were recorded so far."""
        return len(self.syncs)

    def __enter__(self) -> HostSyncGuard:
        if self.cuda:
            self._caught = warnings.catch_warnings(record=True)
            self._warnings = self._caught.__enter__()
            warnings.simplefilter("always")
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error" if self.strict else "warn")
        super().__enter__()  # type: ignore[no-untyped-call]  # bare in torch
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        super().__exit__(kind, error, trace)  # type: ignore[no-untyped-call]  # bare in torch
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode(self._cuda_mode)
        self._caught.__exit__(kind, error, trace)
        self._caught = None
        for caught in self._warnings:
            if _CUDA_SYNC_WARNING in str(caught.message):
                self.syncs.append(f"CUDA: {caught.message} ({os.path.basename(caught.filename)}:{caught.lineno})")
            else:  # not ours: pass it on
                warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        what = sync_of(func, args, kwargs)
        if what is not None and not _host_side.get():
            self.syncs.append(f"{what} ({_caller()})")
            if self.strict:
                raise HostSyncError(f"host sync inside the guard: {self.syncs[-1]}")
        return func(*args, **kwargs)


def sync_of(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """What a torch call would make the host wait for on a GPU ('Tensor.item', ...), or None."""
    name = getattr(func, "__name__", "")
    if name in _READS:
        return f"{name}: reads a value on the host"
    if name in _SIZED_BY_VALUES:
        return f"{name}: its output size depends on values"
    if name == "where" and len(args) == 1 and not kwargs:
        return "where(condition): its output size depends on values"
    if name == "repeat_interleave" and _tensor_repeats(args, kwargs):
        return "repeat_interleave: tensor repeats and no output_size"
    if name in _INDEXING and len(args) > 1 and _has_mask(args[1]):
        return f"{name} with a boolean mask: its output size depends on values"
    if name in ("cpu", "to", "cuda", "copy_", "tensor", "as_tensor"):
        return _copy(name, args, kwargs)
    return None


def _tensor_repeats(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    if kwargs.get("output_size") is not None or len(args) > 3:
        return False
    repeats = args[0] if len(args) == 1 else kwargs.get("repeats", args[1] if len(args) > 1 else None)
    return isinstance(repeats, torch.Tensor)


def _has_mask(index: object) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return False


def _copy(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    """A copy between the host and another device that makes the host wait, if this call is one."""
    if name in ("tensor", "as_tensor"):
        data = args[0] if args else kwargs.get("data")
        if isinstance(data, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in data):
            return f"{name} of a list of tensors: reads their values on the host"
        device = kwargs.get("device")
        if device is not None and torch.device(device).type != "cpu":
            return f"{name}(device={device}): a blocking copy from the host"
        return None
    source = args[0] if name != "copy_" else (args[1] if len(args) > 1 else kwargs.get("src"))
    if not isinstance(source, torch.Tensor):
        return None
    if name == "cpu":
        target, non_blocking = torch.device("cpu"), False
    elif name == "cuda":
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        target = torch.device("cuda")
    elif name == "copy_":
        target = args[0].device
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        parsed_device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if parsed_device is None:
            return None
        target = parsed_device
    if source.device.type != "cpu" and target.type == "cpu":
        return f"{name}: a copy to the host from {source.device}"
    if source.device.type == "cpu" and target.type != "cpu" and not non_blocking:
        return f"{name}: a blocking copy from the host to {target}"
    return None


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(_TORCH_DIR)):
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
    if frame is None:
        return "?"
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"
