"""`herd make-tiny`: a complete, few-MB Llama 4 checkpoint in the published Hugging Face layout.

It is the embedded default model and the fixture of every later parity test, so it is written the way
Meta's checkpoints are: Llama4ForConditionalGeneration config with `text_config` (rope_theta +
rope_scaling, as Meta writes them), `language_model.`-prefixed bf16 tensors in sharded safetensors with
an index, a BPE tokenizer with the Llama 4 special tokens after its vocabulary, a generation config and
the image processor settings (`preprocessor_config.json`).
Weights are random (scaled so every layer matters) and reproducible from the seed. The vision tower is
tiny too (one encoder layer of width 32, 336-pixel tiles of 144 features, as Meta's) and ships its
`vision_model.*` and `multi_modal_projector.*` tensors, drawn from a generator of their own so the text
weights of a seed do not depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from herd.model.checkpoint_writer import write_sharded
from herd.model.config import ModelConfig
from herd.model.image_processor import ImageProcessorConfig
from herd.model.image_prompts import PREPROCESSOR_CONFIG, preprocessor_config
from herd.model.llama4 import Llama4Model
from herd.model.special_tokens import (
    END_OF_TEXT,
    EOM,
    EOT,
    FINETUNE_RIGHT_PAD,
    IMAGE_END,
    IMAGE_START,
    PATCH,
)
from herd.model.tiny_tokenizer import train_tiny_tokenizer
from herd.model.tokenizer import Tokenizer
from herd.model.vision import VisionTower
from herd.model.vision_config import VisionConfig

_SHARED = dict(
    hidden_size=128, intermediate_size=64, intermediate_size_mlp=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts_per_tok=1,
    rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
    # Small chunk and temperature floor, so short prompts already cross chunk boundaries and
    # reach the positions where NoPE layers' temperature tuning changes the result.
    attention_chunk_size=16, attn_temperature_tuning=True, floor_scale=32, attn_scale=0.1,
    no_rope_layers=None, no_rope_layer_interval=4, attention_bias=False, tie_word_embeddings=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Scout: every layer MoE, 16 experts, QK norm, llama3 rope scaling with Scout's own factors.
    "scout": dict(
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                          original_max_position_embeddings=8192),
    ),
    # Maverick: MoE every second layer with dense MLPs between, more experts, no QK norm, plain rope.
    "maverick": dict(num_local_experts=32, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
}

_VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=336,
    patch_size=14, num_channels=3, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
    pixel_shuffle_ratio=0.5, norm_eps=1e-5, hidden_act="gelu", vision_feature_select_strategy="default",
    multi_modal_projector_bias=False, model_type="llama4_vision_model",
)
# The vision generator's seed is this far from the text one, so the two never draw the same stream.
_VISION_SEED_OFFSET = 1 << 20

SHARD_BYTES = 1 << 20
DTYPE = torch.bfloat16


def make_tiny(out: str | Path, *, preset: str = "scout", seed: int = 0) -> Path:
    """Write the tiny checkpoint of `preset` into `out` (created if needed) and return the directory."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(out)
    raw = _config(preset, tokenizer)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(tokenizer), indent=2) + "\n")
    processor = ImageProcessorConfig(tile_px=_VISION["image_size"])
    (out / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config(processor), indent=2) + "\n")
    tensors = random_weights(ModelConfig.from_hf(raw, source=str(out / "config.json")), seed=seed)
    vision = random_vision_weights(VisionConfig.from_hf(raw, source=str(out / "config.json")), seed=seed)
    named = {**{f"language_model.{name}": t for name, t in tensors.items()}, **vision}
    write_sharded(out, ((name, named[name]) for name in sorted(named)), shard_bytes=SHARD_BYTES)
    return out


def random_weights(config: ModelConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """Every text tensor, canonical names, drawn so each layer moves the output (std ~ 1/sqrt(fan_in))."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama4Model(config.text).named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise  # not all ones, so a norm loaded wrong shows
        elif name.endswith("embed_tokens.weight"):
            value = noise
        else:  # Linear [out, in] and fused experts [E, in, out]: fan_in is the dim contracted
            fan_in = shape[-1] if name.endswith(".weight") else shape[-2]
            value = noise * fan_in**-0.5
        weights[name] = value.to(DTYPE)
    return weights


def random_vision_weights(config: VisionConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """Every vision tower and projector tensor, checkpoint names, drawn like the text ones.

    LayerNorm weights sit near one and biases near zero, but off them, so a norm or bias loaded wrong shows.
    """
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in VisionTower(config).named_parameters()}
    generator = torch.Generator().manual_seed(seed + _VISION_SEED_OFFSET)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator)
        if "layernorm" in name and name.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        else:  # Linear [out, in]; class and positional embeddings [.., Hv]: scaled like the reference's init
            value = noise * shape[-1] ** -0.5
        weights[name] = value.to(DTYPE)
    return weights


def _config(preset: str, tokenizer: Tokenizer) -> dict[str, Any]:
    stop_ids = [tokenizer.token_to_id(t) for t in (END_OF_TEXT, EOM, EOT)]
    text = {
        **_SHARED,
        **PRESETS[preset],
        "model_type": "llama4_text",
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stop_ids,
        "pad_token_id": tokenizer.token_to_id(FINETUNE_RIGHT_PAD),
    }
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text,
        "vision_config": _VISION,
        "boi_token_index": tokenizer.token_to_id(IMAGE_START),
        "eoi_token_index": tokenizer.token_to_id(IMAGE_END),
        "image_token_index": tokenizer.token_to_id(PATCH),
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": [tokenizer.token_to_id(t) for t in (END_OF_TEXT, EOM, EOT)],
        "pad_token_id": tokenizer.token_to_id(FINETUNE_RIGHT_PAD),
        "do_sample": False,
    }
