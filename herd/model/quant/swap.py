"""Swap a model's layers (built on the meta device) for the quantised ones its quantization_config asks for.

Herd keeps the feed-forward weights quantised: routed experts, the shared expert and the dense MLPs (the
bulk of Llama 4's bytes, and the scope of the published FP8 checkpoint). Everything else (attention,
router, embeddings, norms) is built in the model's float dtype; a checkpoint that stores one of those
quantised anyway is dequantised when loaded (herd.model.loader).
"""

from __future__ import annotations

from torch import nn

from herd.model.llama4 import Llama4Model
from herd.model.mlp import FeedForward
from herd.model.moe import Experts, MoE
from herd.model.quant.config import QuantizationConfig
from herd.model.quant.linear import QuantizedLinear

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def quantize_modules(model: Llama4Model, quantization: QuantizationConfig) -> list[str]:
    """Swap in int4 / FP8 modules where `quantization` does not ignore them; the names swapped, in order."""
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, MoE) and experts_quantized(f"{name}.experts", module.num_experts, quantization):
            old = module.experts
            module.experts = Experts(model.config, old.expert_ids, scheme=quantization.scheme,
                                     group=quantization.group_size)
            swapped.append(f"{name}.experts")
        elif isinstance(module, FeedForward):
            for proj in _PROJECTIONS:
                full = f"{name}.{proj}"
                linear: nn.Linear = getattr(module, proj)
                if quantization.quantizes(full):
                    setattr(module, proj, QuantizedLinear(linear.in_features, linear.out_features,
                                                          quantization.scheme, quantization.group_size))
                    swapped.append(full)
    return swapped


def experts_quantized(prefix: str, num_experts: int, quantization: QuantizationConfig) -> bool:
    """All of a layer's experts are quantised or none is (they are stored fused): ValueError for a mix."""
    names = [prefix, *(f"{prefix}.{e}.{proj}" for e in range(num_experts) for proj in _PROJECTIONS)]
    quantized = {quantization.quantizes(n) for n in names}
    if len(quantized) > 1:
        raise ValueError(f"quantization_config.ignore keeps some but not all experts of {prefix} in bfloat16; "
                         f"Herd stores a layer's experts together, so it needs all or none")
    return quantized.pop()
