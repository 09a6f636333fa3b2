"""MoE primitives in four stages: route -> permute -> experts -> combine.

One API for every caller (the model's MoE layers, later the expert shards). The torch backend runs
everywhere and is the reference; a CUDA backend joins it behind the same functions.
"""

from herd.kernels.reference import moe_reference
from herd.kernels.torch_moe import Permutation, combine, experts, permute, route

__all__ = ["Permutation", "combine", "experts", "moe_reference", "permute", "route"]
