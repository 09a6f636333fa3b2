"""Herd's vision tower against transformers' Llama4VisionModel + Llama4MultiModalProjector.

The reference is a whole Llama4ForConditionalGeneration, initialised by its own init, then saved with
save_pretrained and loaded by Herd from that directory. Its init leaves LayerNorms at ones and biases
at zeros, which would hide a bias or norm that Herd failed to load, so those are redrawn before saving;
every loaded tensor, and each step of the computation, is then shown to move the result.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Llama4Config, Llama4ForConditionalGeneration
from transformers.models.llama4 import modeling_llama4 as hf

from herd.model import vision
from herd.model.checkpoint import CheckpointError
from herd.model.vision import load_vision, pixel_shuffle, vision_rotations
from herd.model.vision_config import VisionConfig, load_vision_config
from tests.hf_reference import text_config

TOLERANCE = 1e-4
TILES = 3

VISION_VARIANTS = {
    # 4 x 4 patches -> 4 features per tile, 2 heads of 16.
    "grid4": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  image_size=56, patch_size=14, vision_output_dim=48, projector_input_dim=48,
                  projector_output_dim=48),
    # 6 x 6 patches of 7 pixels -> 9 features per tile, 4 heads of 16, another rotary base.
    "grid6": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  image_size=42, patch_size=7, vision_output_dim=96, projector_input_dim=96,
                  projector_output_dim=96, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def build(variant: str, seed: int) -> Llama4ForConditionalGeneration:
    torch.manual_seed(seed)
    config = Llama4Config(
        text_config=text_config("scout"), vision_config={**VISION_VARIANTS[variant], "initializer_range": 0.1}
    )
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("vision_model.", "multi_modal_projector.")) and param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))  # norms off 1, biases off 0 (class token too)
    return model


def save(model: Llama4ForConditionalGeneration, directory, *, sharded: bool):
    model.save_pretrained(directory, max_shard_size="100KB" if sharded else "1GB")
    return directory


def pixels(config, seed: int) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.rand(TILES, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


@torch.no_grad()
def reference(model: Llama4ForConditionalGeneration, px: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model.vision_model(px, output_hidden_states=True)
    return {
        "encoder": out.hidden_states[-1],  # before layernorm_post, class token included
        "vision": out.last_hidden_state,  # the adapter's output
        "features": model.multi_modal_projector(out.last_hidden_state),
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """One reference, its pixels and outputs, and Herd's tower loaded from its checkpoint."""
    ref = build("grid4", 11)
    px = pixels(ref.config, 11)
    tower = load_vision(save(ref, tmp_path_factory.mktemp("vision"), sharded=True))
    return tower, px, reference(ref, px)


@pytest.mark.parametrize("variant", sorted(VISION_VARIANTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_match_reference(tmp_path, variant, seed):
    ref = build(variant, seed)
    assert ref.vision_model.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0, "an unfilled reference"
    tower = load_vision(save(ref, tmp_path, sharded=seed != 0))
    px = pixels(ref.config, 100 + seed)
    expected = reference(ref, px)
    features = tower.image_features(px)
    side = ref.config.vision_config.image_size // ref.config.vision_config.patch_size
    assert features.shape == (TILES, (side // 2) ** 2, ref.config.text_config.hidden_size)
    assert features.shape[1] == tower.config.tokens_per_tile
    with torch.no_grad():
        errors = {
            "encoder": rel_error(tower.vision_model.encode(px), expected["encoder"]),
            "vision": rel_error(tower.vision_model(px), expected["vision"]),
            "features": rel_error(features, expected["features"]),
        }
    assert max(errors.values()) < TOLERANCE, f"{variant} seed {seed}: {errors}"


def test_every_loaded_tensor_moves_the_features(loaded):
    tower, px, expected = loaded
    generator = torch.Generator().manual_seed(0)
    harmless = []
    for name, param in tower.named_parameters():
        original = param.detach().clone()
        with torch.no_grad():  # the same values in the wrong places, as a mis-read layout would give
            param.copy_(original.flatten()[torch.randperm(param.numel(), generator=generator)].view_as(param))
        error = rel_error(tower.image_features(px), expected["features"])
        with torch.no_grad():
            param.copy_(original)
        if error < 10 * TOLERANCE:
            harmless.append((name, error))
    assert not harmless, f"scrambling these did not break parity, so the test cannot see them: {harmless}"
    assert rel_error(tower.image_features(px), expected["features"]) < TOLERANCE


# The real functions, kept before any test replaces the module's names with a mutation of them.
ROTATIONS, SHUFFLE = vision.vision_rotations, vision.pixel_shuffle


def _no_rotary(config, device):
    return torch.ones_like(ROTATIONS(config, device))


def _rotary_axes_swapped(config, device):
    rot = ROTATIONS(config, device)  # [S, D/2]: column pairs, then row pairs
    quarter = config.head_dim // 4
    return torch.cat([rot[:, quarter:], rot[:, :quarter]], dim=-1)


def _shuffle_grid_transposed(x, s):
    out = SHUFFLE(x, s)
    n, f, c = out.shape
    side = int(f**0.5)
    return out.view(n, side, side, c).transpose(1, 2).reshape(n, f, c)


def _shuffle_channels_column_first(x, s):
    out = SHUFFLE(x, s)
    n, f, c = out.shape
    return out.view(n, f, s, s, c // (s * s)).transpose(2, 3).reshape(n, f, c)


MUTATIONS = {
    "no_rotary": ("vision_rotations", _no_rotary),
    "rotary_axes_swapped": ("vision_rotations", _rotary_axes_swapped),
    "shuffle_grid_transposed": ("pixel_shuffle", _shuffle_grid_transposed),
    "shuffle_channels_column_first": ("pixel_shuffle", _shuffle_channels_column_first),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_wrong_computation_fails_the_tolerance(loaded, monkeypatch, mutation):
    tower, px, expected = loaded
    monkeypatch.setattr(vision, *MUTATIONS[mutation])
    assert rel_error(tower.image_features(px), expected["features"]) > 10 * TOLERANCE


def test_adapter_without_its_last_gelu_fails_the_tolerance(loaded, monkeypatch):
    tower, px, expected = loaded
    monkeypatch.setattr(vision.AdapterMLP, "forward", lambda self, x: self.fc2(torch.nn.functional.gelu(self.fc1(x))))
    assert rel_error(tower.image_features(px), expected["features"]) > 10 * TOLERANCE


@pytest.mark.parametrize("variant", sorted(VISION_VARIANTS))
def test_rotations_and_pixel_shuffle_equal_the_reference_exactly(variant):
    ref_config = Llama4Config(text_config=text_config("scout"), vision_config=VISION_VARIANTS[variant])
    ours = VisionConfig.from_hf(ref_config.to_dict())
    theirs = hf.Llama4VisionRotaryEmbedding._compute_freqs_ci(ref_config.vision_config)  # [S, 1, D/2]
    assert torch.equal(vision_rotations(ours), theirs[:, 0])
    x = torch.randn(2, ours.patches_per_side**2, ours.hidden_size)
    assert torch.equal(pixel_shuffle(x, ours.shuffle_factor), hf.pixel_shuffle(x, ours.pixel_shuffle_ratio))


def test_bfloat16_tower_stays_close(tmp_path, loaded):
    _, px, expected = loaded
    ref = build("grid4", 11)
    tower = load_vision(save(ref, tmp_path, sharded=False), dtype=torch.bfloat16)
    features = tower.image_features(px)
    assert features.dtype == torch.bfloat16
    assert rel_error(features, expected["features"]) < 5e-2


def test_pixel_values_of_the_wrong_shape_are_refused(loaded):
    tower, px, _ = loaded
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 56, 56\], got \(3, 3, 28, 28\)"):
        tower.image_features(px[:, :, :28, :28])
    with pytest.raises(ValueError, match="floating point"):
        tower.image_features(px.to(torch.uint8))


def test_checkpoint_without_vision_weights_is_refused(tmp_path):
    ref = build("grid4", 0)
    ref.config.save_pretrained(tmp_path)
    text_only = {k: v for k, v in ref.state_dict().items() if k.startswith("language_model.")}
    save_file({k: v.contiguous() for k, v in text_only.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks \d+ vision tensors, e.g. \['multi_modal_projector"):
        load_vision(tmp_path)


# --- configuration ---


def _raw(**vision_overrides):
    config = Llama4Config(text_config=text_config("scout"), vision_config=VISION_VARIANTS["grid4"]).to_dict()
    config["vision_config"].update(vision_overrides)
    return config


def test_saved_reference_config_parses(tmp_path):
    ref = build("grid6", 0)
    ref.config.save_pretrained(tmp_path)
    config = load_vision_config(tmp_path)
    assert (config.patches_per_side, config.shuffle_factor, config.tokens_per_tile) == (6, 2, 9)
    assert config.head_dim == 16 and config.rope_theta == 500.0
    assert config.text_hidden_size == ref.config.text_config.hidden_size
    assert config.image_token_id == ref.config.image_token_id == 200092
    assert (config.boi_token_id, config.eoi_token_id) == (200080, 200081)


def test_scout_vision_config_gives_144_tokens_per_tile():
    scout = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
                 image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
                 projector_output_dim=4096, rope_theta=10000, pixel_shuffle_ratio=0.5, norm_eps=1e-5,
                 vision_feature_layer=-1, vision_feature_select_strategy="default")
    raw = {**_raw(), "vision_config": scout}
    raw["text_config"]["hidden_size"] = 5120
    config = VisionConfig.from_hf(raw)
    assert (config.tokens_per_tile, config.head_dim, config.text_hidden_size) == (144, 88, 5120)


def test_config_without_vision_config_is_refused(tmp_path):
    raw = _raw()
    del raw["vision_config"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vision_config is missing"):
        load_vision_config(tmp_path)
    text_only = {**raw["text_config"], "model_type": "llama4_text"}
    with pytest.raises(ValueError, match=r"vision_config is missing \(model_type 'llama4_text'\)"):
        VisionConfig.from_hf(text_only)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"hidden_size": -32}, "hidden_size"),
        ({"num_attention_heads": 3}, "num_attention_heads 3"),
        ({"num_attention_heads": 4, "hidden_size": 24, "intermediate_size": 96}, "head_dim"),
        ({"patch_size": 15}, "patch_size 15"),
        ({"image_size": [56, 42]}, "image_size"),
        ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio"),
        ({"image_size": 42}, "pixel_shuffle_ratio 0.5 needs patches per side"),
        ({"intermediate_size": 100}, "intermediate_size 100"),
        ({"projector_output_dim": 64}, "projector_input_dim"),
        ({"vision_output_dim": 64}, "vision_output_dim 64"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"norm_eps": 1e-6}, "norm_eps"),
        ({"multi_modal_projector_bias": True}, "multi_modal_projector_bias"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "rope_type"),
        ({"num_hidden_layers": "two"}, "num_hidden_layers"),
    ],
)
def test_bad_vision_values_are_refused_by_name(overrides, named):
    with pytest.raises(ValueError) as err:
        VisionConfig.from_hf(_raw(**overrides), source="ckpt/config.json")
    assert named in str(err.value) and str(err.value).startswith("ckpt/config.json: "), str(err.value)


def test_bad_image_token_is_refused_by_name():
    with pytest.raises(ValueError, match="image_token_id"):
        VisionConfig.from_hf({**_raw(), "image_token_index": -1})
