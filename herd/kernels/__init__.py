"""MoE primitives in four stages: route -> permute -> experts -> combine.

One API for every caller (the model's MoE layers, the expert shards): `herd.kernels.api` checks the
inputs and the tensors' device picks the backend (torch on CPU; CuPy kernels plus cuBLAS on CUDA).
`moe_reference` is the plain MoE every backend is tested against.
"""

from herd.kernels.api import combine, experts, permute, route
from herd.kernels.permutation import Permutation
from herd.kernels.quantized import QuantizedTensor, quantize
from herd.kernels.quantized import matmul as quantized_matmul
from herd.kernels.reference import moe_reference
from herd.kernels.torch_moe import swiglu

__all__ = ["Permutation", "QuantizedTensor", "combine", "experts", "moe_reference", "permute", "quantize",
           "quantized_matmul", "route", "swiglu"]
