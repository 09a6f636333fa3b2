"""Herd's CUDA kernels run: herd.kernels.cupy_moe, unchanged, on the stand-in cupy and the CUDA emulator.

Each kernel (route, permute, combine, int4 dequantise, int4 GEMV) against the torch backend on CPU tensors, in
each fiber resume order (forward, reverse, random): bit-exact where the docstrings promise it (route's ids,
permute's stable order and rows, combine, dequantise), within a stated ulp or relative bound elsewhere.
torch's CUDA queries that cupy_moe makes (current stream, SM count) answer with CPU stand-ins. The emulator
runs each CUDA thread as a fiber, so shapes are small. What this does not prove: tests/cudaemu/README.md.
The kernels are built as the sanitizer variant whose runtime this process was started with
(tests.cudaemu.sanitizer_env: LD_PRELOAD of libasan or libtsan), else plain: the same tests serve all three runs
(under TSan in the random order only and without E=128 permutes: here about 5 s plain, 13 s ASan, 23 s TSan).
Issue 19's three bugs each have a test here that fails on the code before their fix (NaN vs +inf in route,
hidden size 0, int4 Dout 0); the int4 dequantise runs through QuantizedTensor.dequantize's CUDA backend branch.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from herd.kernels import int4, quantized, torch_moe
from herd.kernels.quantized import QuantizedTensor
from tests.cudaemu import ORDERS, fake_cupy, runtime_loaded
from tests.unit.kernels.cupy_import import cupy_moe_against
from tests.unit.kernels.moe_inputs import distinct_logits

VARIANT = next((variant for variant in ("asan", "tsan") if runtime_loaded(variant)), "plain")
SMS = 4
"""The SM count the stand-in device reports (int4_matmul's split plan reads it)."""
DTYPES = [torch.float32, torch.bfloat16]
RUN_ORDERS = ("random",) if VARIANT == "tsan" else ORDERS
"""Under TSan one order is enough (its happens-before tracking does not depend on the interleaving) and each
fiber costs ~20x more."""


@pytest.fixture
def cupy_moe(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """herd.kernels.cupy_moe imported against the fake cupy; sys.modules and torch.cuda put back after."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=SMS))
    threads = torch.get_num_threads()
    if VARIANT == "tsan":  # torch's OpenMP workers (libgomp, not instrumented) read as races in torch's own code
        torch.set_num_threads(1)
    try:
        with fake_cupy.use_variant(VARIANT), cupy_moe_against(fake_cupy, monkeypatch) as module:
            yield module
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=RUN_ORDERS)
def cuda(request: pytest.FixtureRequest, cupy_moe: types.ModuleType) -> Iterator[types.ModuleType]:
    """cupy_moe with every launch resuming its fibers in one order (random: a fixed seed)."""
    with fake_cupy.launch_order(request.param, seed=1234):
        yield cupy_moe


def _assert_ulps(got: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """|got - expected| <= ulps units of `expected`'s dtype, relative to |expected|."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bound = ulps * torch.finfo(expected.dtype).eps * expected.float().abs()
    error = (got.float() - expected.float()).abs()
    assert bool((error <= bound).all()), f"max error {float((error - bound).max())} over {ulps} ulps"


# route ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("tokens", "experts", "k"), [(1, 1, 1), (7, 5, 3), (5, 16, 2), (9, 128, 3), (4, 128, 1)])
def test_route_picks_torchs_top_k_and_its_sigmoid(cuda: Any, dtype: torch.dtype, tokens: int, experts: int,
                                                  k: int) -> None:
    logits = distinct_logits(tokens, experts, torch.Generator().manual_seed(tokens * experts)).to(dtype)
    ids, scores = cuda.route(logits, k)
    expected_ids, expected_scores = torch_moe.route(logits, k)
    assert torch.equal(ids, expected_ids)
    _assert_ulps(scores, expected_scores, ulps=2 if dtype == torch.float32 else 1)


def test_route_breaks_ties_by_the_lowest_expert_id_across_lanes(cuda: Any) -> None:
    logits = torch.zeros(3, 70)
    logits[1, [65, 33, 1]] = 1.0  # three lanes' ties: 1 (lane 1), 33 (lane 1, slot 1), 65 (lane 1, slot 2)
    logits[2, [64, 40]] = 2.0
    ids, _ = cuda.route(logits, 3)
    assert ids.tolist() == [[0, 1, 2], [1, 33, 65], [40, 64, 0]]


def test_route_ranks_nan_above_finite_logits(cuda: Any) -> None:
    logits = torch.tensor([[2.0, -1.0, float("nan"), 5.0, float("nan")]])
    ids, scores = cuda.route(logits, 3)
    assert ids.tolist() == torch_moe.route(logits, 3)[0].tolist() == [[2, 4, 3]]
    assert scores[0, :2].isnan().all()


def test_route_ranks_nan_above_infinity_as_torch_topk_does(cupy_moe: Any) -> None:
    """Issue 19: NaN was keyed as +inf, so a +inf at a lower expert id tied with it and won."""
    logits = torch.tensor([[float("inf"), float("nan"), 0.0]])
    ids, _ = cupy_moe.route(logits, 2)
    assert ids.tolist() == torch_moe.route(logits, 2)[0].tolist() == [[1, 0]]


# permute and combine --------------------------------------------------------------------------------------------

PERMUTE_SHAPES = [  # tokens, experts, k, hidden: one row; k=3 with odd H; zero-row experts; H over one block; E=128
    (1, 1, 1, 3), (7, 5, 3, 37), (3, 16, 2, 300), (5, 128, 2, 8),
]
if VARIANT == "tsan":  # small shapes only under TSan: E=128 is 128 blocks of 256 fibers a launch
    PERMUTE_SHAPES = PERMUTE_SHAPES[:-1]


def _routed(tokens: int, experts: int, k: int, hidden: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens * 1000 + experts * 10 + k)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids, _ = torch_moe.route(distinct_logits(tokens, experts, g), k)
    scores = torch.rand(tokens, k, generator=g).to(dtype)
    return x, ids, scores


def _orders(experts: int) -> list[torch.Tensor]:
    return [torch.arange(experts), torch.randperm(experts, generator=torch.Generator().manual_seed(experts))]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("tokens", "experts", "k", "hidden"), PERMUTE_SHAPES)
def test_permute_equals_torchs_bit_for_bit_in_any_expert_order(cuda: Any, dtype: torch.dtype, tokens: int,
                                                              experts: int, k: int, hidden: int) -> None:
    x, ids, scores = _routed(tokens, experts, k, hidden, dtype)
    for expert_order in _orders(experts):
        rows, got = cuda.permute(x, ids, scores, expert_order)
        expected_rows, expected = torch_moe.permute(x, ids, scores, expert_order)
        assert torch.equal(got.expert_offsets, expected.expert_offsets)
        assert torch.equal(got.row_source.long(), expected.row_source)
        assert torch.equal(got.source_row.long(), expected.source_row)
        assert torch.equal(rows, expected_rows)


def test_permute_with_every_row_on_one_expert_keeps_token_order(cuda: Any) -> None:
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))  # more rows than one block of 256
    ids = torch.full((300, 1), 3, dtype=torch.int32)
    rows, got = cuda.permute(x, ids, torch.ones(300, 1), torch.arange(5))
    assert got.expert_offsets.tolist() == [0, 0, 0, 0, 300, 300]
    assert got.row_source.tolist() == list(range(300)) and torch.equal(rows, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("tokens", "experts", "k", "hidden"), PERMUTE_SHAPES)
def test_combine_equals_torchs_bit_for_bit(cuda: Any, dtype: torch.dtype, tokens: int, experts: int, k: int,
                                           hidden: int) -> None:
    x, ids, scores = _routed(tokens, experts, k, hidden, dtype)
    _, permutation = torch_moe.permute(x, ids, scores, _orders(experts)[1])
    out_rows = torch.randn(tokens * k, hidden, generator=torch.Generator().manual_seed(9)).to(dtype)
    got = cuda.combine(out_rows, permutation, tokens)
    assert torch.equal(got, torch_moe.combine(out_rows, permutation, tokens))


def test_hidden_size_zero_launches_no_empty_grid_and_returns_torchs_empty_tensors(cupy_moe: Any) -> None:
    """Issue 19: H = 0 launched gather and combine on grids with a zero dimension, which CUDA refuses (and so
    does the emulator, LaunchError); torch returns the empty tensors."""
    x, ids, scores = _routed(3, 4, 2, 0, torch.float32)
    with fake_cupy.record_launches() as launches:
        rows, permutation = cupy_moe.permute(x, ids, scores, torch.arange(4))
        out = cupy_moe.combine(rows, permutation, 3)
    expected_rows, expected = torch_moe.permute(x, ids, scores, torch.arange(4))
    assert rows.shape == expected_rows.shape == (6, 0) and out.shape == (3, 0)
    assert torch.equal(permutation.expert_offsets, expected.expert_offsets)
    assert torch.equal(permutation.source_row.long(), expected.source_row)
    assert [launch.kernel for launch in launches] == ["moe_histogram", "moe_offsets", "moe_positions"]


# int4 -----------------------------------------------------------------------------------------------------------

def _int4(d_in: int, d_out: int, group: int, seed: int = 0, lead: tuple[int, ...] = ()) -> QuantizedTensor:
    weight = torch.randn(*lead, d_in, d_out, generator=torch.Generator().manual_seed(seed))
    packed, scales = int4.quantize_int4(weight, group)
    return QuantizedTensor("int4", packed, scales, d_in, group)


@pytest.fixture
def on_cuda_backend(cupy_moe: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """QuantizedTensor.dequantize's backend is the CuPy one for CPU tensors too: its CUDA branch end to end."""
    backend = cupy_moe.CupyBackend()
    monkeypatch.setattr(quantized, "backend_for", lambda device: backend)
    return backend


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("d_in", "d_out", "group"), [(7, 5, 4), (33, 3, 8), (128, 6, 128), (130, 9, 32), (8, 0, 2)])
def test_quantized_tensor_dequantises_on_the_cuda_backend_as_torch_does(
        cuda: Any, on_cuda_backend: Any, dtype: torch.dtype, d_in: int, d_out: int, group: int) -> None:
    weight = _int4(d_in, d_out, group, seed=d_in)
    with fake_cupy.record_launches() as launches:
        got = weight.dequantize(dtype)
    expected = int4.dequantize_int4(weight.values, weight.scales, d_in, group=group, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
    assert [launch.kernel for launch in launches] == ([f"int4_dequantize_{cuda._SUFFIX[dtype]}"] if d_out else [])


def _matmul_bound(x: torch.Tensor, weight: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Float accumulation in another order (a few eps of sum |x||w|), plus one rounding to x's dtype."""
    accumulation = 8 * torch.finfo(torch.float32).eps * (x.float().abs() @ weight.abs()) * x.shape[1] ** 0.5
    bound: torch.Tensor = accumulation + torch.finfo(x.dtype).eps * expected.abs()
    return bound


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("rows", "d_in", "d_out", "group"), [
    (1, 100, 12, 32),  # two splits, the last one short
    (3, 45, 8, 8),  # odd Din: the padding input
    (8, 64, 520, 16),  # the most rows; 130 column quads: two blocks of 128 threads
    (2, 300, 4, 128),
])
def test_int4_gemv_matches_x_times_the_dequantised_weight(cuda: Any, dtype: torch.dtype, rows: int, d_in: int,
                                                          d_out: int, group: int) -> None:
    weight = _int4(d_in, d_out, group, seed=rows)
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(d_in)).to(dtype)
    with fake_cupy.record_launches() as launches:
        got = cuda.int4_matmul(x, weight)
    assert got is not None and [launch.kernel[:17] for launch in launches] == ["int4_gemv_partial", "int4_gemv_reduce_"]
    dense = int4.dequantize_int4(weight.values, weight.scales, d_in, group=group, dtype=torch.float32)
    expected = x.float() @ dense
    assert got.dtype == dtype and got.shape == (rows, d_out)
    error = (got.float() - expected).abs()
    assert bool((error <= _matmul_bound(x, dense, expected)).all()), float(error.max())


def test_int4_gemv_is_the_same_in_every_order(cupy_moe: Any) -> None:
    """Split-K partial sums added in a fixed order: the docstring promises results independent of scheduling."""
    weight, x = _int4(100, 12, 32), torch.randn(2, 100, generator=torch.Generator().manual_seed(5))
    results = []
    for order in ORDERS:
        with fake_cupy.launch_order(order, seed=7):
            results.append(cupy_moe.int4_matmul(x, weight))
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_int4_matmul_where_the_gemv_does_not_apply_dequantises_on_the_cuda_backend(
        cuda: Any, on_cuda_backend: Any) -> None:
    weight = _int4(40, 6, 8)  # Dout not a multiple of 4: no GEMV, dequantise then matmul
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))
    with fake_cupy.record_launches() as launches:
        got = on_cuda_backend.quantized_matmul(x, weight)
    assert [launch.kernel for launch in launches] == ["int4_dequantize_f32"]
    expected = x @ int4.dequantize_int4(weight.values, weight.scales, 40, group=8, dtype=torch.float32)
    assert torch.equal(got, expected)


def test_int4_matmul_of_no_outputs_returns_an_empty_tensor(cupy_moe: Any, on_cuda_backend: Any) -> None:
    """Issue 19: Dout = 0 divided by zero planning the GEMV's column blocks; torch returns an empty [R, 0]."""
    weight = _int4(16, 0, 8)
    got = on_cuda_backend.quantized_matmul(torch.randn(2, 16), weight)
    assert got.shape == (2, 0)
