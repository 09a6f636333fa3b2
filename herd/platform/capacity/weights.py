"""Weight bytes of a Llama 4 checkpoint by part and format, counted from Herd's own modules.

The model and the vision tower are built on the meta device (shapes, no memory) and every parameter is
put in one part by its name, so the count is exactly what Herd loads (the published totals, 109B and
400B, are checked in the tests). The weight format changes the feed-forward weights only (routed experts,
shared expert, dense MLPs): attention, router, norms, embeddings and the vision tower stay bfloat16, the
scope of the published FP8 Maverick checkpoint, whose `ignore` list keeps those out of FP8.
- bf16: 2 bytes a weight;
- fp8 (e4m3): 1 byte a weight and a float32 scale per output channel;
- int4 (symmetric, group 128 along the input): half a byte a weight and a bfloat16 scale per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.model.config import TextConfig
from herd.model.llama4 import Llama4Model
from herd.model.vision import VisionTower
from herd.model.vision_config import VisionConfig

FORMATS = ("bf16", "fp8", "int4")
INT4_GROUP = 128
"""Input weights sharing one int4 scale."""
PARTS = ("embeddings", "attention", "dense_mlp", "shared_expert", "router", "routed_experts", "vision")
QUANTISED = frozenset({"dense_mlp", "shared_expert", "routed_experts"})
"""Parts whose matrices take the weight format; the rest are bfloat16 whatever the format."""


@dataclass(frozen=True)
class WeightSizes:
    """Bytes and weights of each part of one checkpoint in one weight format."""

    weight_format: str
    bytes: dict[str, int]
    """PARTS -> bytes in the format."""
    params: dict[str, int]
    """PARTS -> weights (parameters)."""
    expert_bytes: int
    """One routed expert of one MoE layer (gate, up and down, with their scales)."""
    moe_layers: int

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def trunk_bytes(self) -> int:
        """Everything but the routed experts: what a replica's trunk holds."""
        return self.total_bytes - self.bytes["routed_experts"]

    def experts_bytes(self, experts: int) -> int:
        """`experts` routed experts of every MoE layer (what one expert shard holding them loads)."""
        return experts * self.moe_layers * self.expert_bytes


def part_of(name: str) -> str:
    """The part a parameter of Llama4Model belongs to, by its name."""
    if "feed_forward.experts." in name:
        return "routed_experts"
    if "feed_forward.shared_expert." in name:
        return "shared_expert"
    if "feed_forward.router." in name:
        return "router"
    if ".feed_forward." in name:
        return "dense_mlp"
    if name.startswith(("model.embed_tokens", "lm_head")):
        return "embeddings"
    return "attention"  # projections, q/k norms and every RMSNorm (they live beside attention)


def matrix_bytes(inputs: int, outputs: int, weight_format: str) -> int:
    """One weight matrix of `inputs` x `outputs` in the format, with its scales."""
    weights = inputs * outputs
    if weight_format == "bf16":
        return 2 * weights
    if weight_format == "fp8":
        return weights + 4 * outputs
    if weight_format == "int4":
        return -(-weights // 2) + 2 * -(-inputs // INT4_GROUP) * outputs
    raise ValueError(f"weight format must be one of {FORMATS}, got {weight_format!r}")


def weight_sizes(text: TextConfig, vision: VisionConfig | None, weight_format: str) -> WeightSizes:
    """Bytes and weights of every part in `weight_format` (bf16, fp8 or int4)."""
    if weight_format not in FORMATS:
        raise ValueError(f"weight format must be one of {FORMATS}, got {weight_format!r}")
    params, sizes = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
    with torch.device("meta"):
        model = Llama4Model(text)
        tower = VisionTower(vision) if vision is not None else None
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # a tied lm_head is the embedding matrix
            continue
        seen.add(id(param))
        part = part_of(name)
        params[part] += param.numel()
        sizes[part] += _param_bytes(param, weight_format if part in QUANTISED else "bf16")
    if tower is not None:
        params["vision"] = sum(p.numel() for p in tower.parameters())
        sizes["vision"] = 2 * params["vision"]
    h, i = text.hidden_size, text.intermediate_size
    per_expert = matrix_bytes(h, 2 * i, weight_format) + matrix_bytes(i, h, weight_format)
    return WeightSizes(weight_format=weight_format, bytes=sizes, params=params, expert_bytes=per_expert,
                       moe_layers=len(text.moe_layers))


def _param_bytes(param: torch.Tensor, weight_format: str) -> int:
    """nn.Linear weights are [out, in]; fused experts [E, in, out]; vectors (norms) stay bfloat16."""
    if param.dim() == 2:
        return matrix_bytes(param.shape[1], param.shape[0], weight_format)
    if param.dim() == 3:
        return param.shape[0] * matrix_bytes(param.shape[1], param.shape[2], weight_format)
    return 2 * param.numel()
