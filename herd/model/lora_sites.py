"""Where a LoRA adapter may act in Herd's Llama 4, and the shape of each weight it adapts.

A site is (layer, module name under `model.layers.{layer}.`), named as the checkpoint names the module:
  self_attn.{q,k,v,o}_proj                           every layer
  feed_forward.shared_expert.{gate,up,down}_proj     MoE layers (the shared expert)
  feed_forward.{gate,up,down}_proj                   dense layers (Maverick's interleaved MLPs)
  feed_forward.experts.{gate_up,down}_proj           MoE layers, the routed experts: one A/B pair per expert
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.model.config import TextConfig

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHARED_EXPERT = tuple(f"feed_forward.shared_expert.{m}" for m in MLP)
DENSE_MLP = tuple(f"feed_forward.{m}" for m in MLP)
EXPERTS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")  # in the module's order


@dataclass(frozen=True)
class SiteShape:
    """The adapted weight as y = W x: x has d_in features, y d_out; `experts` > 0 for a per-expert stack."""

    d_in: int
    d_out: int
    experts: int = 0


Site = tuple[int, str]  # (layer, module name)


def layer_sites(config: TextConfig, layer: int) -> dict[str, SiteShape]:
    """Every adaptable module of `layer` and its shape."""
    hidden, heads, kv_heads, dim = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                    config.head_dim)
    sites = {
        "self_attn.q_proj": SiteShape(hidden, heads * dim),
        "self_attn.k_proj": SiteShape(hidden, kv_heads * dim),
        "self_attn.v_proj": SiteShape(hidden, kv_heads * dim),
        "self_attn.o_proj": SiteShape(heads * dim, hidden),
    }
    if config.is_moe(layer):
        inter, experts = config.intermediate_size, config.num_local_experts
        sites.update(_mlp(SHARED_EXPERT, hidden, inter))
        sites["feed_forward.experts.gate_up_proj"] = SiteShape(hidden, 2 * inter, experts)
        sites["feed_forward.experts.down_proj"] = SiteShape(inter, hidden, experts)
    else:
        sites.update(_mlp(DENSE_MLP, hidden, config.intermediate_size_mlp))
    return sites


def _mlp(names: tuple[str, ...], hidden: int, inter: int) -> dict[str, SiteShape]:
    gate, up, down = names
    return {gate: SiteShape(hidden, inter), up: SiteShape(hidden, inter), down: SiteShape(inter, hidden)}
