"""The published Llama 4 configurations, as their checkpoints' config.json has them (text and vision parts).

Only the fields that size the model are given; the parser (herd.model.config) fills the rest with the
Llama 4 defaults. Scout: 48 layers, all MoE with 16 experts, 10M positions. Maverick: the same trunk,
MoE on every second layer with 128 experts and a dense MLP between, 1M positions.
"""

from __future__ import annotations

from typing import Any

_TEXT: dict[str, Any] = dict(
    model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
    intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, num_experts_per_tok=1, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
    attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
    no_rope_layer_interval=4, attention_bias=False, tie_word_embeddings=False, bos_token_id=200000,
    eos_token_id=[200001, 200007, 200008], pad_token_id=200018,
)

_VISION: dict[str, Any] = dict(
    model_type="llama4_vision_model", hidden_size=1408, num_hidden_layers=34, num_attention_heads=16,
    intermediate_size=5632, image_size=336, patch_size=14, num_channels=3, vision_output_dim=4096,
    projector_input_dim=4096, projector_output_dim=4096, pixel_shuffle_ratio=0.5, norm_eps=1e-5,
    hidden_act="gelu", vision_feature_select_strategy="default", multi_modal_projector_bias=False,
    rope_theta=10000,
)

PRESETS: dict[str, dict[str, Any]] = {
    "scout": {
        "text": dict(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                     max_position_embeddings=10485760,
                     rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                       original_max_position_embeddings=8192)),
        "published_params": 109e9,
    },
    "maverick": {
        "text": dict(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                     max_position_embeddings=1048576, rope_scaling=None),
        "published_params": 400e9,
    },
}
"""Per model: what differs from the shared text config, and the total parameter count Meta published."""


def preset_config(name: str) -> dict[str, Any]:
    """The config.json of a published model, by name (scout, maverick)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)} or give a config.json")
    return {
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "text_config": {**_TEXT, **PRESETS[name]["text"]}, "vision_config": dict(_VISION),
        "image_token_index": 200092, "boi_token_index": 200080, "eoi_token_index": 200081,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
