"""config.json's quantization_config: the forms Herd loads, the ignore list, and the forms it refuses."""

from __future__ import annotations

import copy

import pytest

from herd.model.config import ModelConfig, read_config_json
from herd.model.quant.config import QuantizationConfig
from herd.model.tiny import make_tiny

# Shaped like the published Maverick FP8 checkpoint's: compressed-tensors, FP8 weights per channel,
# FP8 activations per token (dynamic), and an ignore list naming modules in the multimodal spelling.
COMPRESSED_FP8 = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                              "symmetric": True},
    }},
    "ignore": ["re:.*self_attn.*", "re:.*router.*",
               "language_model.model.layers.0.feed_forward.shared_expert.gate_proj", "re:vision_model.*", "lm_head"],
}


def test_compressed_tensors_fp8_and_its_ignore_list():
    q = QuantizationConfig.from_hf(COMPRESSED_FP8)
    assert q.scheme == "fp8"
    assert q.quantizes("model.layers.3.feed_forward.experts.7.up_proj")
    assert q.quantizes("model.layers.0.feed_forward.shared_expert.up_proj")
    assert not q.quantizes("model.layers.0.feed_forward.shared_expert.gate_proj")  # listed with the prefix
    assert not q.quantizes("model.layers.0.self_attn.q_proj")  # a pattern
    assert not q.quantizes("lm_head")
    assert QuantizationConfig.from_hf(q.to_hf()) == q


def test_herd_int4_round_trips():
    q = QuantizationConfig(scheme="int4", group_size=64, ignore=("lm_head",))
    raw = q.to_hf()
    assert raw["quant_method"] == "herd" and raw["bits"] == 4
    assert QuantizationConfig.from_hf(raw) == q


def _broken(path: tuple[str, ...], value) -> dict:
    raw = copy.deepcopy(COMPRESSED_FP8)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return raw


@pytest.mark.parametrize(("raw", "message"), [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    (_broken(("format",), "pack-quantized"), "format 'pack-quantized'"),
    (_broken(("config_groups", "group_0", "weights", "strategy"), "block"), "one scale per output channel"),
    (_broken(("config_groups", "group_0", "weights", "num_bits"), 4), "weights"),
    (_broken(("config_groups", "group_0", "input_activations", "dynamic"), False), "per token, dynamically"),
    (_broken(("config_groups", "group_0", "input_activations"), None), "input activations"),
    (_broken(("config_groups",), {}), "needs config_groups"),
    (_broken(("ignore",), "lm_head"), "ignore must be a list"),
    ({"quant_method": "herd", "format": "int4-grouped", "bits": 4, "group_size": 3}, "even integer"),
    ({"quant_method": "herd", "format": "int8", "bits": 8}, "int4-grouped"),
])
def test_unsupported_quantization_is_refused_with_the_reason(raw, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConfig.from_hf(raw)


def test_model_config_carries_it_and_names_the_file(tmp_path):
    raw, _ = read_config_json(make_tiny(tmp_path))
    assert ModelConfig.from_hf(raw).quantization is None
    assert ModelConfig.from_hf({**raw, "quantization_config": COMPRESSED_FP8}).quantization.scheme == "fp8"
    with pytest.raises(ValueError, match=r"somewhere/config\.json: quantization_config: quant_method 'awq'"):
        ModelConfig.from_hf({**raw, "quantization_config": {"quant_method": "awq"}}, source="somewhere/config.json")
