"""load_model / load_experts: subsets of experts, tied embeddings, dtypes, and inputs that are wrong."""

from __future__ import annotations

import json

import pytest
import torch

from herd.model import CheckpointError, MissingExpertsError, load_experts, load_model
from herd.model.checkpoint import Checkpoint
from herd.model.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), preset="scout", seed=3)


def _experts_used(model, ids):
    """Experts each MoE layer routes `ids` to, recorded by an executor that runs the local experts."""
    used: set[int] = set()

    def record(layer, rows, offsets):
        used.update(offsets.diff().nonzero().flatten().tolist())
        return model.model.layers[layer].feed_forward.experts(rows, offsets)

    model.set_experts_executor(record)
    model.logits(ids)
    model.set_experts_executor(None)
    return used


def test_a_model_holding_only_the_routed_experts_computes_the_same_logits(tiny):
    full = load_model(tiny, progress=False)
    ids = torch.arange(3, 9)
    used = _experts_used(full, ids)
    assert 0 < len(used) < 16, "the check needs some experts left out"
    subset = load_model(tiny, experts=sorted(used, reverse=True), progress=False)
    experts = subset.model.layers[0].feed_forward.experts
    assert experts.expert_ids == tuple(sorted(used))
    assert experts.gate_up_proj.shape[0] == len(used)
    torch.testing.assert_close(subset.logits(ids), full.logits(ids), rtol=0, atol=0)
    unused = next(e for e in range(16) if e not in used)
    partial = load_model(tiny, experts=sorted(used - {min(used)}) or [unused], progress=False)
    with pytest.raises(MissingExpertsError, match=f"experts \\[{min(used)}"):
        partial.logits(ids)


def test_a_trunk_without_experts_needs_an_executor(tiny):
    trunk = load_model(tiny, experts=(), progress=False)
    assert trunk.model.layers[0].feed_forward.experts.gate_up_proj.shape[0] == 0
    with pytest.raises(MissingExpertsError):
        trunk.logits(torch.arange(4))


def test_load_experts_returns_the_slices_of_every_moe_layer(tiny):
    layers = load_experts(tiny, [7, 2, 11], dtype=torch.bfloat16)
    checkpoint = Checkpoint(tiny)
    assert sorted(layers) == [0, 1, 2, 3]
    for layer, weights in layers.items():
        assert weights.expert_ids == (2, 7, 11)
        full = checkpoint.tensor(f"model.layers.{layer}.feed_forward.experts.down_proj")
        torch.testing.assert_close(weights.down, full[[2, 7, 11]].to(torch.bfloat16), rtol=0, atol=0)
        assert weights.gate_up.dtype == torch.bfloat16


@pytest.mark.parametrize(("experts", "message"), [([16], r"\[16\]"), ([1, 1], "twice")])
def test_bad_expert_subsets(tiny, experts, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny, experts=experts, progress=False)


def test_bfloat16_load_keeps_every_tensor_in_bfloat16(tiny):
    half = load_model(tiny, dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    logits = half.logits(torch.arange(20))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def _copy_with_config(src, dst, **text_overrides):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    raw = json.loads((src / "config.json").read_text())
    raw["text_config"].update(text_overrides)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_tied_embeddings_without_lm_head(tiny, tmp_path):
    path = _copy_with_config(tiny, tmp_path / "tied", tie_word_embeddings=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["language_model.lm_head.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(path, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = _copy_with_config(path, tmp_path / "untied", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"no lm_head\.weight"):
        load_model(untied, progress=False)


def test_config_that_does_not_fit_the_tensors(tiny, tmp_path):
    path = _copy_with_config(tiny, tmp_path / "wide", intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"shape .* config\.json implies"):
        load_model(path, progress=False)
    deeper = _copy_with_config(tiny, tmp_path / "deep", num_hidden_layers=5)
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.4"):
        load_model(deeper, progress=False)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([1, 2, 512]), "token id 512 is outside the vocabulary 0..511"),
        (torch.tensor([-1, 2]), "token id -1"),
        (torch.tensor([[1, 2]]), "1-D"),
        (torch.tensor([1.0, 2.0]), "integers"),
        (torch.tensor([], dtype=torch.long), "empty"),
    ],
)
def test_bad_token_ids_raise_value_error(tiny, ids, message):
    model = load_model(tiny, progress=False)
    with pytest.raises(ValueError, match=message):
        model.logits(ids)
    assert model.logits(torch.tensor([1, 2])).shape == (2, 512), "still usable afterwards"
