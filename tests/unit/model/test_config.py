"""Reading HF Llama 4 configs: both layouts, derived fields as transformers derives them, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Llama4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from herd.model import load_config
from herd.model.config import ModelConfig, RopeConfig
from herd.model.rope import inv_frequencies
from tests.hf_reference import LLAMA3_ROPE, build

BASE = {"model_type": "llama4_text", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def _write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("layout", ["conditional", "causal"])
def test_saved_reference_configs_parse_to_the_same_text_config(tmp_path, layout):
    ref = build("maverick", 0, layout=layout)
    ref.config.save_pretrained(tmp_path)
    config = load_config(tmp_path)
    text = config.text
    assert config.multimodal == (layout == "conditional")
    assert text.moe_layers == (1, 3)
    assert text.use_rope == (True, True, True, False)
    assert text.layer_types == ("chunked_attention",) * 3 + ("full_attention",)
    assert text.chunk_size(0) == 8 and text.chunk_size(3) is None
    assert not text.use_qk_norm and text.num_local_experts == 16


def test_defaults_follow_transformers():
    raw = {"model_type": "llama4_text", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 32,
           "num_hidden_layers": 8, "num_attention_heads": 16, "interleave_moe_layer_step": 2}
    ours = ModelConfig.from_hf(raw).text
    theirs = Llama4TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert list(ours.moe_layers) == theirs.moe_layers
    assert [int(r) for r in ours.use_rope] == theirs.no_rope_layers
    assert list(ours.layer_types) == theirs.layer_types
    assert ours.head_dim == theirs.head_dim and ours.num_key_value_heads == theirs.num_key_value_heads


def test_meta_style_rope_scaling_equals_rope_parameters():
    legacy = {"rope_theta": 10000.0, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    modern = {"rope_parameters": LLAMA3_ROPE}
    assert ModelConfig.from_hf({**BASE, **legacy}).text.rope == ModelConfig.from_hf({**BASE, **modern}).text.rope


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "default", "rope_theta": 500000.0}])
def test_rope_frequencies_equal_transformers(rope):
    hf = Llama4TextConfig(vocab_size=10, hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope)
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    theirs = init(hf)[0] if init else 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    params = {k: v for k, v in rope.items() if k not in ("rope_theta",)}
    ours = inv_frequencies(RopeConfig(theta=rope["rope_theta"], **params), 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type 'llama'"),
        ({"model_type": "llama4"}, "text_config"),
        ({**BASE, "num_key_value_heads": 3}, "num_key_value_heads 3"),
        ({**BASE, "moe_layers": [0, 9]}, "moe_layers [9]"),
        ({**BASE, "num_experts_per_tok": 4, "num_local_experts": 2}, "num_experts_per_tok 4"),
        ({**BASE, "attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4}, "attention_chunk_size"),
        ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
        ({**BASE, "quantization_config": {"quant_method": "fbgemm_fp8"}}, "fbgemm_fp8"),
        ({**BASE, "hidden_size": "64"}, "hidden_size"),
        ({**BASE, "no_rope_layers": [1, 1]}, "no_rope_layers"),
        ({**BASE, "eos_token_id": 500}, "[500]"),
    ],
)
def test_invalid_configs_raise_value_error_naming_the_problem(tmp_path, raw, message):
    with pytest.raises(ValueError) as info:
        load_config(_write(tmp_path, raw))
    assert message in str(info.value)
    assert str(tmp_path / "config.json") in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)
