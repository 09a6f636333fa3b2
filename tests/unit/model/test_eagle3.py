"""EAGLE-3 heads: the tiny head round-trips through the loader, and a head that does not fit its target is refused
with a message naming what does not fit."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.model import load_config
from herd.model.eagle3 import load_eagle3, rotate_half
from herd.model.eagle3_config import Eagle3Config
from herd.model.rope import rotations
from herd.model.tiny import make_tiny
from herd.model.tiny_eagle3 import DRAFT_VOCAB, make_tiny_eagle3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    target = make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=7)
    return target, make_tiny_eagle3(target, seed=7)


def _text(target: Path):
    return load_config(target).text


def test_the_tiny_head_loads_with_its_shapes(tiny):
    target, head_dir = tiny
    text = _text(target)
    head = load_eagle3(head_dir, text, dtype=torch.float32)
    assert head.aux_layers == (1, 2, 3)
    assert head.fc.weight.shape == (text.hidden_size, 3 * text.hidden_size)
    assert head.lm_head.weight.shape == (DRAFT_VOCAB, head.config.hidden_size)
    assert head.midlayer.self_attn.q_proj.weight.shape == (4 * 32, 2 * head.config.hidden_size)
    assert head.config.rope.rope_type == "llama3" and head.shares_embedding
    targets = head.to_target(torch.arange(DRAFT_VOCAB))
    assert bool(head.t2d[targets].all()) and int(head.t2d.sum()) == DRAFT_VOCAB
    assert bool((targets[1:] > targets[:-1]).all())  # distinct target ids
    stored = load_file(head_dir / "model.safetensors")
    assert torch.equal(head.midlayer.hidden_norm.weight, stored["midlayer.hidden_norm.weight"].float())


def test_the_tiny_head_is_reproducible_from_its_seed(tiny, tmp_path):
    target, head_dir = tiny
    again = make_tiny_eagle3(shutil.copytree(target, tmp_path / "t", ignore=shutil.ignore_patterns("eagle3")), seed=7)
    other = make_tiny_eagle3(shutil.copytree(target, tmp_path / "u", ignore=shutil.ignore_patterns("eagle3")), seed=8)
    first, second = load_file(head_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert not torch.equal(first["fc.weight"], load_file(other / "model.safetensors")["fc.weight"])


def test_rotate_half_pairs_channel_i_with_i_plus_half():
    """Llama 3's RoPE, which EAGLE-3 heads are trained with: channel i turns with channel i + D/2."""
    x = torch.zeros(1, 1, 8)
    x[0, 0, 1] = 1.0  # pair 1: channels 1 and 5
    rot = rotations(torch.tensor([1]), torch.tensor([0.0, torch.pi / 2, 0.0, 0.0]))
    turned = rotate_half(x, rot)[0, 0]
    assert torch.allclose(turned, torch.tensor([0, 0, 0, 0, 0, 1.0, 0, 0]), atol=1e-6)


def _misfit(tiny, tmp_path: Path, *, config: Callable[[dict[str, Any]], None] | None = None,
            tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of the tiny head with its config.json or tensors changed."""
    _, head_dir = tiny
    out = shutil.copytree(head_dir, tmp_path / "head")
    if config is not None:
        raw = json.loads((out / "config.json").read_text())
        config(raw)
        (out / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        stored = load_file(out / "model.safetensors")
        tensors(stored)
        save_file(stored, str(out / "model.safetensors"))
    return out


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.__setitem__(key, value)


Tensors = dict[str, torch.Tensor]


def _put(name: str, value: Callable[[Tensors], torch.Tensor]) -> Callable[[Tensors], None]:
    return lambda stored: stored.__setitem__(name, value(stored))


def _shift_last_d2t(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    d2t = stored["d2t"].clone()
    d2t[-1] += 10_000
    return d2t


MISFITS: dict[str, tuple[dict[str, Any], str]] = {
    "fc in-features": (dict(tensors=_put("fc.weight", lambda s: torch.zeros(128, 3 * 64))),
                       r"fc\.weight.*shape \(128, 192\), expected \(128, 384\).*3 aux layers.*hidden size 128"),
    "target hidden size": (dict(config=_set("target_hidden_size", 256)),
                           "target_hidden_size 256 does not fit the target's hidden size 128"),
    "embedding shared across widths": (dict(config=_set("hidden_size", 64)),
                                       "shares the target's embedding, but its hidden size 64 is not the target's 128"),
    "vocabulary": (dict(config=_set("vocab_size", 1000)), "vocab_size 1000 does not fit the target's vocabulary"),
    "d2t out of range": (dict(tensors=_put("d2t", _shift_last_d2t)),
                         r"d2t maps draft id 63 to target id \d+, outside the target's vocabulary"),
    "t2d length": (dict(tensors=_put("t2d", lambda s: s["t2d"][:-1])), r"'t2d' has shape .*one flag per target id"),
    "aux layer outside": (dict(config=_set("eagle_config", {"eagle_aux_hidden_state_layer_ids": [1, 2, 7]})),
                          r"aux hidden state layers \[7\] are outside the target's layers 0\.\.3"),
    "default aux layers repeat": (dict(config=lambda raw: raw.pop("eagle_config")), r"\(1, 2, 2\) repeat a layer"),
    "missing tensor": (dict(tensors=lambda s: s.pop("midlayer.hidden_norm.weight")),
                       r"lacks tensors \['midlayer\.hidden_norm\.weight'\]"),
    "unexpected tensor": (dict(tensors=_put("midlayer.extra.weight", lambda s: torch.zeros(2))),
                          r"unexpected tensors \['midlayer\.extra\.weight'\]"),
    "lm_head rows": (dict(tensors=_put("lm_head.weight", lambda s: torch.zeros(65, 128))),
                     r"'lm_head\.weight' has shape \(65, 128\), expected \(64, 128\) \(draft_vocab_size 64"),
    "no d2t for a smaller draft vocabulary": (dict(tensors=lambda s: s.pop("d2t")), "has no d2t tensor"),
    "not an EAGLE-3 head": (dict(config=_set("architectures", ["LlamaForCausalLM"])), "name no EAGLE-3 head"),
    "two layers": (dict(config=_set("num_hidden_layers", 2)), "EAGLE-3 heads of one decoder layer"),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_head_that_does_not_fit_is_refused(tiny, tmp_path, case):
    change, message = MISFITS[case]
    head_dir = _misfit(tiny, tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        load_eagle3(head_dir, _text(tiny[0]), dtype=torch.float32)


def test_specforge_names_and_an_own_embedding_load(tiny, tmp_path):
    """SpecForge writes `model.layers.0.*` and `model.*`; a head with its own embed_tokens does not share."""
    def rename(stored: dict[str, torch.Tensor]) -> None:
        for name in list(stored):
            if name.startswith("midlayer."):
                stored["model.layers.0." + name.removeprefix("midlayer.")] = stored.pop(name)
            elif name in ("fc.weight", "norm.weight"):
                stored["model." + name] = stored.pop(name)
        stored["model.embed_tokens.weight"] = torch.full((stored["t2d"].shape[0], 128), 0.5)

    head = load_eagle3(_misfit(tiny, tmp_path, tensors=rename), _text(tiny[0]), dtype=torch.float32)
    assert not head.shares_embedding and bool((head.embed_tokens.weight == 0.5).all())
    assert head.midlayer.hidden_norm.weight.abs().sum() > 0


def test_config_defaults_follow_vllm():
    raw = {"architectures": ["Eagle3LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 100}
    config = Eagle3Config.from_hf(raw)
    assert config.head_dim == 16 and config.num_key_value_heads == 4 and config.draft_vocab_size == 100
    assert config.aux_layers(48) == (2, 24, 45) and config.rope.theta == 10000.0
    top_level = Eagle3Config.from_hf({**raw, "eagle_aux_hidden_state_layer_ids": [44, 1, 23]})
    assert top_level.aux_layers(48) == (1, 23, 44)  # low to high, as the target's forward meets them
