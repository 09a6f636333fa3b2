"""MoE primitives in four stages: route -> permute -> experts -> combine, and matmuls with quantised weights.

One API for every caller (the model's MoE layers, the expert shards): `herd.kernels.api` checks the
inputs, then the backend of the tensors' device runs them (herd.kernels.backend: torch on the CPU; CuPy
kernels plus cuBLAS on CUDA). Quantisation methods (int4, FP8) are registered in herd.kernels.schemes.
`moe_reference` is the plain MoE every backend is tested against.
"""

from herd.kernels.api import combine, experts, permute, quantized_matmul, route
from herd.kernels.permutation import Permutation
from herd.kernels.quantized import QuantizedTensor, quantize
from herd.kernels.reference import moe_reference
from herd.kernels.torch_moe import swiglu

__all__ = ["Permutation", "QuantizedTensor", "combine", "experts", "moe_reference", "permute", "quantize",
           "quantized_matmul", "route", "swiglu"]
