"""Loading LoRA adapters: what load_adapter reads, and every adapter it refuses, with the error naming why."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.model.config import TextConfig
from herd.model.llama4 import Llama4Model
from herd.model.lora import WEIGHTS_FILE, load_adapter
from herd.model.lora_bank import AdapterBank
from herd.model.lora_config import CONFIG_FILE, AdapterError
from herd.model.tiny_lora import make_tiny_lora
from tests.hf_reference import text_config

PREFIX = "base_model.model.language_model.model.layers."


@pytest.fixture(scope="module")
def config() -> TextConfig:
    """Maverick-like: layers 0 and 2 dense, 1 and 3 MoE with 16 experts."""
    return TextConfig.from_hf(text_config("maverick"))


@pytest.fixture
def adapter(tmp_path, config):
    return make_tiny_lora(tmp_path / "adapter", config, rank=4)


def _edit_config(adapter, **changes):
    path = adapter / CONFIG_FILE
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _edit_weights(adapter, edit):
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(adapter / WEIGHTS_FILE))


def test_reads_every_target_group(adapter, config):
    loaded = load_adapter(adapter, config)
    assert loaded.rank == 4 and loaded.scaling == 16.0 / 4
    names = {name for _, name in loaded.modules}
    assert {"self_attn.q_proj", "feed_forward.gate_proj", "feed_forward.shared_expert.down_proj",
            "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"} <= names
    assert loaded.modules[(1, "feed_forward.experts.gate_up_proj")].a.shape == (16, 4, 64)  # [E, r, H]
    assert loaded.modules[(1, "feed_forward.experts.down_proj")].b.shape == (16, 64, 4)  # [E, H, r]
    assert all(layer in (1, 3) for layer, name in loaded.modules if "experts" in name or "shared" in name)


def test_one_expert_weight_alone_is_stored_unnested(tmp_path, config):
    """Targeting only down_proj, PEFT stores its pair under experts.lora_* (no base_layer)."""
    adapter = make_tiny_lora(tmp_path / "a", config, rank=2, targets=("experts",))
    _edit_config(adapter, target_parameters=["feed_forward.experts.down_proj"])

    def keep_down_only(tensors):
        for key in [k for k in tensors if ".experts.base_layer." in k]:
            del tensors[key]
    _edit_weights(adapter, keep_down_only)
    loaded = load_adapter(adapter, config)
    assert {name for _, name in loaded.modules} == {"feed_forward.experts.down_proj"}


@pytest.mark.parametrize(("changes", "message"), [
    (dict(r=0), r"r=0; the rank must be an integer in 1\.\.64"),
    (dict(r=65), r"r=65"),
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "trained biases"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(peft_type="IA3"), "LORA adapters only"),
    (dict(lora_alpha=-1), "lora_alpha=-1"),
    (dict(target_modules=["q_proj", "lm_head"]), "target_modules names 'lm_head'"),
    (dict(target_parameters=["feed_forward.router.weight"]), "target_parameters names"),
])
def test_refuses_unsupported_config(adapter, config, changes, message):
    _edit_config(adapter, **changes)
    with pytest.raises(AdapterError, match=message) as err:
        load_adapter(adapter, config)
    assert CONFIG_FILE in str(err.value)


def test_refuses_a_rank_that_disagrees_with_the_file(adapter, config):
    _edit_config(adapter, r=8)
    with pytest.raises(AdapterError, match=r"layers\.0\.[a-z_.]+: lora_A \[4, \d+\].*do not fit: r=8"):
        load_adapter(adapter, config)


def test_refuses_a_target_with_no_factors(adapter, config):
    _edit_weights(adapter, lambda t: [t.pop(k) for k in list(t) if ".k_proj." in k])
    with pytest.raises(AdapterError, match=r"target_modules names 'k_proj', but adapter_model\.safetensors holds no"):
        load_adapter(adapter, config)


def test_refuses_a_module_the_layer_lacks(adapter, config):
    def shared_expert_on_dense_layer(tensors):
        for part, shape in (("A", (4, 64)), ("B", (32, 4))):
            tensors[f"{PREFIX}0.feed_forward.shared_expert.gate_proj.lora_{part}.weight"] = torch.zeros(shape)
    _edit_weights(adapter, shared_expert_on_dense_layer)
    with pytest.raises(AdapterError, match=r"layers\.0\.feed_forward\.shared_expert\.gate_proj: no such module.*"
                                           r"a dense layer"):
        load_adapter(adapter, config)


def test_refuses_experts_on_a_dense_layer(adapter, config):
    def experts_on_layer_0(tensors):
        for key in [k for k in tensors if k.startswith(f"{PREFIX}1.feed_forward.experts")]:
            tensors[key.replace(f"{PREFIX}1.", f"{PREFIX}0.")] = tensors[key].clone()
    _edit_weights(adapter, experts_on_layer_0)
    with pytest.raises(AdapterError, match="layer 0 is dense; it has no routed experts"):
        load_adapter(adapter, config)


def test_refuses_a_layer_the_model_lacks(adapter, config):
    def layer_9(tensors):
        for key in [k for k in tensors if k.startswith(f"{PREFIX}0.self_attn.q_proj")]:
            tensors[key.replace(f"{PREFIX}0.", f"{PREFIX}9.")] = tensors[key].clone()
    _edit_weights(adapter, layer_9)
    with pytest.raises(AdapterError, match=r"layers\.9\.self_attn\.q_proj: the model has layers 0\.\.3"):
        load_adapter(adapter, config)


@pytest.mark.parametrize(("key", "shape", "message"), [
    (f"{PREFIX}0.self_attn.q_proj.lora_A.weight", (4, 63), r"q_proj: lora_A \[4, 63\].*need A \[4, 64\]"),
    (f"{PREFIX}0.self_attn.k_proj.lora_B.weight", (64, 4), r"k_proj: .*lora_B \[64, 4\].*B \[32, 4\]"),
    (f"{PREFIX}1.feed_forward.experts.lora_A.weight", (4 * 17, 64), r"17|experts.*do not fit: r=4, 16 experts"),
])
def test_refuses_shapes_that_do_not_fit(adapter, config, key, shape, message):
    _edit_weights(adapter, lambda t: t.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(AdapterError, match=message):
        load_adapter(adapter, config)


@pytest.mark.parametrize(("key", "message"), [
    ("base_model.model.language_model.lm_head.lora_A.weight", "is not a LoRA weight of a decoder layer's module"),
    ("base_model.model.vision_model.model.layers.0.self_attn.q_proj.lora_A.weight", "is not a LoRA weight"),
    (f"{PREFIX}0.self_attn.q_proj.lora_magnitude_vector", "is not a LoRA weight"),
    (f"{PREFIX}0.self_attn.q_proj.lora_A.weight", "has no lora_B.weight"),  # replaces the pair's B below
])
def test_refuses_keys_it_cannot_place(adapter, config, key, message):
    def edit(tensors):
        tensors[key] = torch.zeros(4, 64)
        tensors.pop(f"{PREFIX}0.self_attn.q_proj.lora_B.weight") if "lora_B" in message else None
    _edit_weights(adapter, edit)
    with pytest.raises(AdapterError, match=message):
        load_adapter(adapter, config)


def test_refuses_missing_files(tmp_path, adapter, config):
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        load_adapter(tmp_path / "nowhere", config)
    (adapter / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        load_adapter(adapter, config)


def test_refuses_a_module_target_modules_does_not_select(adapter, config):
    _edit_config(adapter, target_modules=r".*\.self_attn\.(q|k|v|o)_proj")
    with pytest.raises(AdapterError, match="does not select this module"):
        load_adapter(adapter, config)


def test_expert_pairs_must_match_target_parameters(adapter, config):
    _edit_config(adapter, target_parameters=["feed_forward.experts.gate_up_proj"])  # the file holds both
    with pytest.raises(AdapterError, match="PEFT would store 1 nested pair"):
        load_adapter(adapter, config)


def test_bank_refuses_what_cannot_run_here(adapter, config):
    loaded = load_adapter(adapter, config)
    with pytest.raises(AdapterError, match="rank 4 is over this bank's max_rank 2"):
        AdapterBank(config, slots=1, max_rank=2, dtype=torch.float32, device="cpu").load(0, loaded)
    with pytest.raises(AdapterError, match="holds quantised"):
        AdapterBank(config, slots=1, dtype=torch.float32, device="cpu", quantized_experts=True).load(0, loaded)
    other = TextConfig.from_hf(text_config("maverick", hidden_size=32, head_dim=8))
    with pytest.raises(AdapterError, match="does not fit this model"):
        AdapterBank(other, slots=1, dtype=torch.float32, device="cpu").load(0, loaded)
    with pytest.raises(ValueError, match=r"slot must be in 0\.\.0"):
        AdapterBank(config, slots=1, dtype=torch.float32, device="cpu").load(1, loaded)


def test_forward_checks_adapter_slots(adapter, config):
    torch.manual_seed(0)
    model = Llama4Model(config)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="no adapter bank"):
        model(ids, adapter_slots=torch.zeros(3, dtype=torch.int64))
    model.new_adapter_bank(slots=2).load(0, load_adapter(adapter, config))
    with pytest.raises(ValueError, match=r"adapter_slots hold -1\.\.2"):
        model(ids, adapter_slots=torch.tensor([-1, 0, 2]))
    with pytest.raises(ValueError, match=r"must be an integer tensor \[3\]"):
        model(ids, adapter_slots=torch.zeros(2, dtype=torch.int64))
    model.set_experts_executor(lambda layer, rows, offsets: rows)
    with pytest.raises(ValueError, match="routed-expert LoRA needs the experts held in this process"):
        model(ids, adapter_slots=torch.zeros(3, dtype=torch.int64))
