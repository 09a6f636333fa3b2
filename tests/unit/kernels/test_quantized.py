"""QuantizedTensor and the quantised expert GEMMs on the CPU, against dequantised and float references."""

from __future__ import annotations

import pytest
import torch

from herd import kernels
from herd.kernels import QuantizedTensor, quantize, quantized_matmul
from herd.kernels import schemes as quantized_module

E, H, INTER = 4, 256, 64  # two int4 groups along H


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, H, 2 * INTER, generator=g) / H**0.5, torch.randn(E, INTER, H, generator=g) / INTER**0.5


def _rows(seed: int, counts=(5, 0, 7, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.randn(sum(counts), H, generator=torch.Generator().manual_seed(seed + 100))
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    return rows, offsets


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_experts_are_the_float_experts_of_the_dequantised_weights(seed):
    gate_up, down = _weights(seed)
    rows, offsets = _rows(seed)
    q_gate_up, q_down = quantize(gate_up, "int4"), quantize(down, "int4")
    out = kernels.experts(rows, offsets, q_gate_up, q_down)
    exact = kernels.experts(rows, offsets, q_gate_up.dequantize(torch.float32), q_down.dequantize(torch.float32))
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-6)
    error = _rel(out, kernels.experts(rows, offsets, gate_up, down))
    assert 0.01 < error < 0.3, error  # int4 of Gaussian weights over two GEMMs: about 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_experts_scale_activations_per_token(seed):
    gate_up, down = _weights(seed)
    rows, offsets = _rows(seed)
    q_gate_up, q_down = quantize(gate_up, "fp8"), quantize(down, "fp8")
    out = kernels.experts(rows, offsets, q_gate_up, q_down)
    error = _rel(out, kernels.experts(rows, offsets, gate_up, down))
    assert 0.005 < error < 0.1, error
    loud = rows.clone()
    loud[0] *= 1e4  # a per-tensor scale would flush the other tokens of the batch to zero
    louder = kernels.experts(loud, offsets, q_gate_up, q_down)
    torch.testing.assert_close(louder[1:5], out[1:5], rtol=0, atol=0)
    weight_only = kernels.experts(rows, offsets, q_gate_up.dequantize(torch.float32).contiguous(),
                                  q_down.dequantize(torch.float32).contiguous())
    assert _rel(out, weight_only) > 1e-3, "activations must be rounded to e4m3 too"


def test_bfloat16_rows_come_back_bfloat16():
    gate_up, down = _weights(3)
    rows, offsets = _rows(3)
    for scheme in ("int4", "fp8"):
        out = kernels.experts(rows.bfloat16(), offsets, quantize(gate_up, scheme), quantize(down, scheme))
        assert out.dtype == torch.bfloat16
        ref = kernels.experts(rows, offsets, gate_up, down)
        assert _rel(out, ref) < 0.3


def test_experts_without_rows_are_never_dequantised(monkeypatch):
    gate_up, down = _weights(4)
    rows, offsets = _rows(4, counts=(0, 6, 0, 0))
    touched: list[int] = []
    real = QuantizedTensor.__getitem__

    def record(self, index):
        touched.append(index)
        return real(self, index)

    monkeypatch.setattr(QuantizedTensor, "__getitem__", record)
    kernels.experts(rows, offsets, quantize(gate_up, "int4"), quantize(down, "int4"))
    assert touched == [1, 1]


def test_quantized_tensor_refuses_tensors_that_do_not_fit():
    packed, scales = torch.zeros(4, 8, dtype=torch.uint8), torch.ones(1, 8, dtype=torch.bfloat16)
    QuantizedTensor("int4", packed, scales, 8)
    with pytest.raises(ValueError, match="does not fit"):
        QuantizedTensor("int4", packed, scales, 10)
    with pytest.raises(ValueError, match="does not fit"):
        QuantizedTensor("fp8", packed, scales, 8)
    with pytest.raises(ValueError, match="scheme"):
        QuantizedTensor("int3", packed, scales, 8)
    with pytest.raises(ValueError, match="cannot multiply"):
        quantized_matmul(torch.ones(2, 9), QuantizedTensor("int4", packed, scales, 8))
    with pytest.raises(IndexError):
        QuantizedTensor("int4", packed, scales, 8)[0]


def test_kernels_experts_refuses_mixed_or_mismatched_weights():
    gate_up, down = _weights(5)
    rows, offsets = _rows(5)
    with pytest.raises(ValueError, match="QuantizedTensor like the other"):
        kernels.experts(rows, offsets, quantize(gate_up, "int4"), down)
    with pytest.raises(ValueError, match="gate_up is int4 but down is fp8"):
        kernels.experts(rows, offsets, quantize(gate_up, "int4"), quantize(down, "fp8"))
    with pytest.raises(ValueError, match="do not fit together"):
        kernels.experts(rows, offsets, quantize(gate_up, "int4"), quantize(down[:, :32], "int4"))


def test_fp8_values_are_column_major_for_the_gpu_gemm():
    weight = quantize(torch.randn(E, H, 2 * INTER), "fp8")
    assert weight.values[0].stride() == (1, H)  # [Din, Dout] over an output-major buffer
    assert weight.nbytes == E * H * 2 * INTER + E * 2 * INTER * 4
    assert not quantized_module._SCALED_MM  # the CPU never asked for the FP8 GEMM
