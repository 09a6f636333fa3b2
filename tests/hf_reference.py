"""Builders for transformers' Llama 4 (the numerical reference) on tiny random configurations.

Weights are drawn by the full model's own init with a larger std than the default 0.02, so every
part of the network moves the logits (tests/unit/model/test_parity.py proves the comparison can fail).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

INIT_STD = 0.1
VOCAB = 300

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# Scout-like: every layer MoE, QK norm, llama3 scaling; Maverick-like: dense/MoE interleaved, no QK norm.
# floor_scale is small so temperature tuning changes the NoPE layers within a 40-token test sequence.
VARIANTS: dict[str, dict[str, Any]] = {
    "scout": dict(
        num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1,
        use_qk_norm=True, rope_parameters=LLAMA3_ROPE,
    ),
    "maverick": dict(
        num_hidden_layers=4, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=2,
        use_qk_norm=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "top2_bias_gqa4": dict(
        num_hidden_layers=5, num_local_experts=6, num_experts_per_tok=2, interleave_moe_layer_step=1,
        use_qk_norm=True, attention_bias=True, num_attention_heads=8, num_key_value_heads=2,
        rope_parameters=LLAMA3_ROPE,
    ),
}

TINY_VISION = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vision_output_dim=64,
    image_size=28, patch_size=14, projector_input_dim=64, projector_output_dim=64,
)


def text_config(variant: str, **overrides: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=8,
        max_position_embeddings=256, floor_scale=4, attn_scale=0.1, initializer_range=INIT_STD,
        eos_token_id=None, bos_token_id=None,
    )
    return {**base, **VARIANTS[variant], **overrides}


def build(variant: str, seed: int, *, layout: str, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised reference: layout 'conditional' (nested config) or 'causal' (flat)."""
    torch.manual_seed(seed)
    text = text_config(variant, **overrides)
    if layout == "conditional":
        return Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=TINY_VISION)).eval()
    if layout == "causal":
        return Llama4ForCausalLM(Llama4TextConfig(**text)).eval()
    raise ValueError(layout)


def text_reference(model: torch.nn.Module) -> Llama4ForCausalLM:
    """The text model to compare against (the wrapper's forward refuses text-only input)."""
    return model.language_model if isinstance(model, Llama4ForConditionalGeneration) else model


def save(model: torch.nn.Module, directory: Path, *, shard_kb: int = 100) -> Path:
    """save_pretrained, sharded so that the index path is exercised."""
    model.save_pretrained(directory, max_shard_size=f"{shard_kb}KB")
    return directory


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return text_reference(model)(ids[None]).logits[0].float()


def per_position_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||ours_t - ref_t|| / ||ref_t|| for every position t: [T]."""
    return (ours - ref).norm(dim=-1) / ref.norm(dim=-1)


@contextlib.contextmanager
def conditional_generation_fixed() -> Iterator[None]:
    """Let transformers 5.24's Llama4ForConditionalGeneration run forward and generate with images.

    Its forward fails after computing the logits, reading `image_outputs` from its language model's
    output, which has no such field (return_dict=False does not help: its decorators force a dict).
    Giving that output class the attribute (None) lets the reference's own code run unchanged.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MoeCausalLMOutputWithPast, "image_outputs", None, raising=False)
        yield


IMAGE = 250  # the placeholder id, inside the tiny vocabulary (transformers' default 200092 is not)
# 4 x 4 patches of 14 pixels -> 4 features (placeholder tokens) per tile; 2 encoder layers.
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=56,
              patch_size=14, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48,
              initializer_range=0.1)
TOKENS_PER_TILE = 4


def build_multimodal(seed: int) -> Llama4ForConditionalGeneration:
    """Scout-like text and a 2-layer vision tower, norms and biases moved off their init (one and zero)."""
    torch.manual_seed(seed)
    config = Llama4Config(text_config=text_config("scout"), vision_config=VISION, image_token_index=IMAGE)
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("vision_model.", "multi_modal_projector.")) and param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model
