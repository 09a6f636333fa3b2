"""One backend object per device type, and the quantisation methods it runs: chosen once, pluggable.

The CuPy backend is imported here against a stand-in `cupy` module (no GPU, no CuPy on this machine), so
that what it calls is checked to exist: its kernels themselves run in `make gpu-check`.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator

import pytest
import torch

from herd import kernels
from herd.kernels import backend as backend_module
from herd.kernels import int4, schemes
from herd.kernels.backend import Backend, backend_for
from herd.kernels.quantized import QuantizedTensor
from tests.unit.kernels.cupy_import import cupy_moe_against


@pytest.fixture
def fresh_choice() -> Iterator[None]:
    """Forget the backends chosen so far, before and after the test."""
    backend_module._backend_of_type.cache_clear()
    yield
    backend_module._backend_of_type.cache_clear()


@pytest.fixture
def cupy_moe(monkeypatch: pytest.MonkeyPatch, fresh_choice: None) -> Iterator[types.ModuleType]:
    """herd.kernels.cupy_moe imported against an empty stand-in cupy (what it calls is resolved lazily)."""
    with cupy_moe_against(types.ModuleType("cupy"), monkeypatch) as module:
        yield module

def _int4(d_in: int = 256, d_out: int = 8, lead: tuple[int, ...] = ()) -> QuantizedTensor:
    weight = torch.randn(*lead, d_in, d_out, generator=torch.Generator().manual_seed(d_in))
    return kernels.quantize(weight, "int4")


def test_the_cpu_backend_is_torch_and_chosen_once(fresh_choice: None) -> None:
    first = backend_for(torch.device("cpu"))
    assert first.name == "torch" and type(first) is Backend
    assert backend_for(torch.device("cpu")) is first


def test_a_gpu_without_cupy_runs_torch_and_says_so_once(
    fresh_choice: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with caplog.at_level(logging.WARNING, logger="herd.kernels.backend"):
        chosen = [backend_for(torch.device("cuda", i)) for i in (0, 1, 0)]
    assert all(b is chosen[0] for b in chosen) and type(chosen[0]) is Backend
    assert sum("CuPy is not importable" in r.getMessage() for r in caplog.records) == 1


def test_with_cupy_a_gpu_gets_the_cupy_backend_once(cupy_moe: types.ModuleType) -> None:
    chosen = backend_for(torch.device("cuda"))
    assert isinstance(chosen, cupy_moe.CupyBackend) and chosen.name == "cupy"
    assert backend_for(torch.device("cuda", 1)) is chosen
    assert isinstance(chosen.scheme("int4"), cupy_moe.CupyInt4)
    assert chosen.scheme("fp8") is schemes.SCHEMES["fp8"]  # no FP8 kernels of its own: torch's


def test_cupy_int4_dequantises_a_matrix_with_its_kernel_and_a_stack_with_torch(
    cupy_moe: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []

    def kernel(weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        calls.append(weight.shape)
        return int4.dequantize_int4(weight.values, weight.scales, weight.d_in, group=weight.group, dtype=dtype)

    monkeypatch.setattr(cupy_moe, "dequantize_int4", kernel)  # raises if the module has no such function
    backend = cupy_moe.CupyBackend()
    matrix, stack = _int4(), _int4(lead=(3,))
    for weight in (matrix, stack):
        want = schemes.SCHEMES["int4"].dequantize(weight, torch.float32)
        assert torch.equal(backend.dequantize(weight, torch.float32), want)
    assert calls == [matrix.shape]


def test_cupy_int4_matmul_uses_the_fused_kernel_and_falls_back_when_it_declines(
    cupy_moe: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused: list[int] = []

    def gemv(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor | None:
        fused.append(x.shape[0])
        return torch.full((x.shape[0], weight.shape[-1]), 7.0) if x.shape[0] <= int4.GEMV_MAX_ROWS else None

    monkeypatch.setattr(cupy_moe, "int4_matmul", gemv)
    backend, weight = cupy_moe.CupyBackend(), _int4()
    x = torch.randn(int4.GEMV_MAX_ROWS + 1, 256)
    assert torch.equal(backend.quantized_matmul(x[:2], weight), torch.full((2, 8), 7.0))
    torch.testing.assert_close(backend.quantized_matmul(x, weight), x @ weight.dequantize(torch.float32))
    assert fused == [2, int4.GEMV_MAX_ROWS + 1]


def test_a_registered_scheme_runs_where_a_backend_has_no_kernels_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    class Halved(schemes.Scheme):
        """A toy method: float16 values, a scale of 2 per output channel."""

        name = "halved"

        def fits(self, values: torch.Tensor, scales: torch.Tensor, d_in: int, group: int) -> bool:
            return values.dtype == torch.float16 and values.shape[-2] == d_in

        def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (weight / 2).half(), torch.full((*weight.shape[:-2], 1, weight.shape[-1]), 2.0)

        def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
            return (weight.values.float() * weight.scales).to(dtype)

    monkeypatch.setitem(schemes.SCHEMES, "halved", Halved())
    weight = torch.randn(2, 64, 32)
    q = kernels.quantize(weight, "halved")
    rows = torch.randn(5, 64)
    offsets = torch.tensor([0, 2, 5])
    got = kernels.experts(rows, offsets, q, kernels.quantize(torch.randn(2, 16, 64), "halved"))
    assert got.shape == (5, 64)
    torch.testing.assert_close(kernels.quantized_matmul(rows, q[0]), rows @ weight[0].half().float(), rtol=1e-3,
                               atol=1e-3)
    with pytest.raises(ValueError, match=r"one of \('int4', 'fp8', 'halved'\), got 'int3'"):
        kernels.quantize(weight, "int3")
