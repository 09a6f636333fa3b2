"""`herd make-tiny --eagle3`: a tiny random EAGLE-3 head for a tiny target, in the published layout.

Written next to the target (`<target>/eagle3/`): config.json (LlamaForCausalLMEagle3, Llama 3 rope scaling, the aux
layer ids under eagle_config) and model.safetensors with EAGLE's names (fc, midlayer.*, norm, lm_head, d2t, t2d). The
draft vocabulary is DRAFT_VOCAB ids of the target's, drawn from the seed; the head shares the target's embedding
(no embed_tokens of its own). Random weights draft nearly nothing the target accepts: the head is for exercising the
machinery, not for speed-ups. Reproducible from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from herd.model.config import load_config
from herd.model.eagle3 import Eagle3Head
from herd.model.eagle3_config import Eagle3Config

DRAFT_VOCAB = 64
"""Draft vocabulary of the tiny head: this many of the target's ids."""
AUX_LAYERS = (1, 2, 3)
"""The tiny target has 4 layers: vLLM's default (2, 2, 1) would repeat a layer."""
SUBDIR = "eagle3"
DTYPE = torch.bfloat16
# The head's generator starts this far from the seed, so its stream differs from the target's text weights.
_SEED_OFFSET = 1 << 21


def head_config(target_dir: str | Path) -> dict[str, Any]:
    """The tiny head's config.json for the tiny target in `target_dir`."""
    text = load_config(target_dir).text
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": text.hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "draft_vocab_size": DRAFT_VOCAB,
        "tie_word_embeddings": False,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(AUX_LAYERS), "use_aux_hidden_state": True},
        "torch_dtype": "bfloat16",
    }


def make_tiny_eagle3(target_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny head for the tiny target in `target_dir` into `<target_dir>/eagle3` and return that directory."""
    target_dir = Path(target_dir)
    raw = head_config(target_dir)
    out = target_dir / SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_file(random_head_weights(raw, seed=seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def random_head_weights(raw: dict[str, Any], *, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the head (EAGLE's names, no embed_tokens), drawn so each part moves the drafts."""
    config = Eagle3Config.from_hf(raw)
    target_hidden = config.target_hidden_size or config.hidden_size
    with torch.device("meta"):
        head = Eagle3Head(config, AUX_LAYERS, target_hidden)
    shapes = {name: p.shape for name, p in head.named_parameters() if not name.startswith("embed_tokens.")}
    generator = torch.Generator().manual_seed(seed + _SEED_OFFSET)
    weights: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator)
        value = 1.0 + 0.1 * noise if name.endswith("norm.weight") else noise * shapes[name][-1] ** -0.5
        weights[name] = value.to(DTYPE)
    chosen = torch.randperm(config.vocab_size, generator=generator)[:config.draft_vocab_size].sort().values
    weights["d2t"] = chosen - torch.arange(config.draft_vocab_size)  # target id = draft id + d2t[draft id]
    t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
    t2d[chosen] = True
    weights["t2d"] = t2d
    return weights
