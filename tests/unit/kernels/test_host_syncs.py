"""HostSyncGuard: every kind of host sync it claims to catch is caught, and work that does not sync is not."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

from herd.kernels.host_syncs import HostSyncError, HostSyncGuard, forward_syncs, host_side

T = torch.arange(6.0)
IDS = torch.tensor([0, 2, 1, 2])
MASK = T > 2
META = torch.zeros(3, device="meta")


def _set_mask() -> None:
    t = T.clone()
    t[MASK] = 0.0


SYNCS: dict[str, Callable[[], object]] = {
    "item": lambda: T[1].item(),
    "tolist": lambda: IDS.tolist(),
    "bool": lambda: bool(T[1]),
    "if": lambda: 1 if T[1] > 0 else 0,
    "int": lambda: int(IDS[1]),
    "float": lambda: float(T[1]),
    "index": lambda: operator.index(IDS[1]),
    "list index": lambda: [10, 11, 12][IDS[2]],
    "complex": lambda: complex(T[1]),
    "numpy": lambda: T.numpy(),
    "array": lambda: np.asarray(T),
    "repr": lambda: repr(T),
    "str": lambda: str(T),
    "format": lambda: f"{T[1]:.1f}",
    "contains": lambda: 2 in IDS,
    "equal": lambda: torch.equal(T, T),
    "allclose": lambda: torch.allclose(T, T),
    "is_nonzero": lambda: torch.is_nonzero(T[1]),
    "nonzero": lambda: MASK.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(MASK, as_tuple=True),
    "argwhere": lambda: torch.argwhere(MASK),
    "unique": lambda: torch.unique(IDS),
    "Tensor.unique": lambda: IDS.unique(return_counts=True),  # type: ignore[no-untyped-call]
    "unique_consecutive": lambda: torch.unique_consecutive(IDS),
    "masked_select": lambda: T.masked_select(MASK),
    "where(condition)": lambda: torch.where(MASK),
    "repeat_interleave(tensor repeats)": lambda: torch.repeat_interleave(T[:4], IDS),
    "Tensor.repeat_interleave(tensor repeats)": lambda: T[:4].repeat_interleave(IDS, dim=0),
    "repeat_interleave(repeats)": lambda: torch.repeat_interleave(IDS),
    "bincount": lambda: torch.bincount(IDS, minlength=3),
    "mask getitem": lambda: T[MASK],
    "mask getitem in a tuple": lambda: T[None][:, MASK],
    "mask setitem": _set_mask,
    "index_put_ with a mask": lambda: T.clone().index_put_((MASK,), torch.tensor(0.0)),
    "tensor of tensors": lambda: torch.tensor([T[0], T[1]]),
}

# Copies between the host and another device need a second device: meta stands in. Strict mode raises
# before the call runs, so what the meta device cannot do never happens.
COPIES: dict[str, Callable[[], object]] = {
    "cpu": lambda: META.cpu(),
    "to cpu": lambda: META.to("cpu"),
    "to a host tensor's device": lambda: META.to(T),
    "copy_ to the host": lambda: T[:3].clone().copy_(META),
    "blocking to a device": lambda: T.to("meta"),
    "blocking to a device with a dtype": lambda: T.to("meta", torch.float64),
    "blocking copy_ to a device": lambda: torch.empty(6, device="meta").copy_(T),
    "tensor on a device": lambda: torch.tensor([1, 2], device="meta"),
    "as_tensor on a device": lambda: torch.as_tensor(T, device="meta"),
}

NOT_SYNCS: dict[str, Callable[[], object]] = {
    "arithmetic": lambda: (T * 2 + 1).sum(),
    "shape and size": lambda: (T.shape[0], T.numel(), len(T), T.dim(), T.device, T.dtype),
    "index_select": lambda: T.index_select(0, IDS),
    "long index getitem": lambda: T[IDS],
    "long index setitem": lambda: T.clone().__setitem__(IDS, 0.0),
    "slices": lambda: T[1:3],
    "topk, argsort, cumsum": lambda: (torch.topk(T, 2), torch.argsort(IDS, stable=True), torch.cumsum(IDS, 0)),
    "scatter_add_": lambda: torch.zeros(3, dtype=torch.long).scatter_add_(0, IDS, torch.ones_like(IDS)),
    "masked_fill": lambda: T.masked_fill(MASK, 0.0),
    "three-argument where": lambda: torch.where(MASK, T, 0.0),
    "repeat_interleave(int)": lambda: T.repeat_interleave(2),
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(T[:4], IDS, output_size=5),
    "to a dtype": lambda: T.to(torch.float64),
    "to the host from the host": lambda: T.to("cpu"),
    "non-blocking to a device": lambda: T.to("meta", non_blocking=True),
    "tensor of numbers": lambda: torch.tensor([1, 2]),
}


@pytest.mark.parametrize("call", SYNCS.values(), ids=SYNCS.keys())
def test_each_kind_of_sync_is_counted_with_where_it_happened(call: Callable[[], object]) -> None:
    with HostSyncGuard(cuda=False) as guard:
        call()
    assert guard.count == 1, guard.syncs
    assert all("test_host_syncs.py:" in sync for sync in guard.syncs), guard.syncs


@pytest.mark.parametrize("call", [*SYNCS.values(), *COPIES.values()], ids=[*SYNCS, *COPIES])
def test_strict_raises_before_the_call_runs(call: Callable[[], object]) -> None:
    with HostSyncGuard(strict=True, cuda=False), pytest.raises(HostSyncError, match="host sync inside the guard"):
        call()


@pytest.mark.parametrize("call", NOT_SYNCS.values(), ids=NOT_SYNCS.keys())
def test_work_that_stays_on_the_device_is_not_counted(call: Callable[[], object]) -> None:
    with HostSyncGuard(strict=True, cuda=False) as guard:
        call()
    assert guard.syncs == []


def test_reads_of_host_data_are_allowed_inside_host_side_only() -> None:
    with HostSyncGuard(cuda=False) as guard:
        with host_side():
            IDS.tolist()
            int(IDS.max())
        IDS.tolist()
    assert guard.count == 1
    assert "tolist" in guard.syncs[0]


def test_nothing_is_counted_after_the_guard_exits() -> None:
    with HostSyncGuard(cuda=False) as guard:
        T[0].item()
    T[0].item()
    assert guard.count == 1


def test_on_cuda_it_enters_the_sync_debug_mode_and_counts_its_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[int | str] = [0]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with HostSyncGuard(cuda=True) as guard:
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert modes == [0, "warn", 0]
    assert len(guard.syncs) == 1
    assert guard.syncs[0].startswith("CUDA: called a synchronizing CUDA operation")
    assert [str(w.message) for w in outside] == ["something else"]  # passed on
    with HostSyncGuard(cuda=True, strict=True):
        pass
    assert modes[-2:] == ["error", 0]


class _Reads(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # one __bool__


def test_forward_syncs_guards_each_forward_of_a_module_and_puts_it_back() -> None:
    module = _Reads()
    with forward_syncs(module, cuda=False) as per_call:
        module(T)
        module(T)
        T[0].item()  # outside the forward: not counted
    module(T)
    assert [len(syncs) for syncs in per_call] == [1, 1]
    assert "forward" not in module.__dict__
    module.forward = lambda x: x  # type: ignore[method-assign]  # an instance's own forward survives
    with forward_syncs(module, cuda=False) as per_call:
        module(T)
    assert per_call == [[]]
    assert module(T) is T
