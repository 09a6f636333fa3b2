"""The Llama 4 vision tower: tiles of pixels -> image features in the text model's hidden size.

Legend: N tiles, C channels, G patches per tile side, P = G*G patches, S = P + 1 (with the class token),
Hv vision hidden, D vision head dim, s shuffle factor (1 / pixel_shuffle_ratio), F = P / s^2 features
per tile, A adapter width, H text hidden.

Each tile is computed on its own, as transformers' Llama4VisionModel and Llama4MultiModalProjector do:
patches (unfold + linear) -> class token appended last -> + positional embedding -> LayerNorm ->
encoder layers (pre-LN bidirectional attention with 2-D rotary; pre-LN GELU MLP) -> LayerNorm ->
class token dropped -> pixel shuffle (each s x s block of patches becomes one token) -> adapter MLP
(GELU after both layers) -> projector. The module tree mirrors the checkpoint (`vision_model.*`,
`multi_modal_projector.*`), so loading is a walk over named parameters.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.checkpoint import Checkpoint, CheckpointError, copy_checked
from herd.model.config import load_config
from herd.model.rope import apply_rotary
from herd.model.vision_config import LAYER_NORM_EPS, VisionConfig, load_vision_config

log = logging.getLogger(__name__)

_PREFIXES = ("vision_model.", "multi_modal_projector.")


def vision_rotations(config: VisionConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit complex rotations [S, D/2]: the first D/4 pairs turn with the patch's column, the rest with its row.

    Coordinates count from 1, so no patch is left unrotated; the class token (last) is not rotated.
    """
    g, pairs = config.patches_per_side, config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, pairs, 2, device=device)[: pairs // 2].float() / pairs)
    patch = torch.arange(g * g, device=device)
    column, row = (patch % g + 1)[:, None], (patch // g + 1)[:, None]  # [P, 1]
    angles = torch.cat([column * inv_freq, row * inv_freq], dim=-1)  # [P, D/2]
    angles = torch.cat([angles, angles.new_zeros(1, pairs)])  # [S, D/2]
    return torch.view_as_complex(torch.stack([angles.cos(), angles.sin()], dim=-1))


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """[N, P, Hv] -> [N, P/s^2, Hv*s^2]: merge each s x s block of the patch grid into one token.

    The channel order is the reference's: s neighbours along a row first, then s along a column.
    """
    n, p, c = x.shape
    g = math.isqrt(p)
    x = x.reshape(n, g, g // s, c * s)  # rows of the grid, s patches of each merged
    x = x.permute(0, 2, 1, 3).reshape(n, g // s, g // s, c * s * s)  # transposed, s rows merged
    return x.permute(0, 2, 1, 3).reshape(n, -1, c * s * s)  # back to row-major order


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, flattened channel-major (as nn.Unfold does), projected without bias."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, G*patch, G*patch] -> [N, P, Hv], patches in row-major order."""
        patches = F.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)  # [N, C*patch^2, P]
        embedded: torch.Tensor = self.linear(patches.transpose(1, 2))  # [N, P, Hv]
        return embedded


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one tile's tokens; every projection has a bias."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x [N, S, Hv], rot [S, D/2] -> [N, S, Hv]."""
        n, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(n, t, -1, self.head_dim), rot)  # [N, S, heads, D]
        k = apply_rotary(self.k_proj(x).view(n, t, -1, self.head_dim), rot)
        v = self.v_proj(x).view(n, t, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        projected: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(n, t, -1))  # [N, S, Hv]
        return projected


class VisionMLP(nn.Module):
    """fc1 -> exact GELU -> fc2, both with bias."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: attention, then MLP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.self_attn = VisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rot)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class VisionEncoder(nn.Module):
    """The stack of encoder layers (`vision_model.model.layers.{i}`)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class AdapterMLP(nn.Module):
    """The vision adapter's MLP: GELU after both bias-free layers, the last one included."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.fc1(x)
        return F.gelu(self.fc2(F.gelu(hidden)))


class VisionAdapter(nn.Module):
    """Pixel shuffle, then the adapter MLP: [N, P, Hv] -> [N, F, A]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.shuffle_factor = config.shuffle_factor
        self.mlp = AdapterMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(pixel_shuffle(x, self.shuffle_factor))
        return out


class VisionModel(nn.Module):
    """Pixels to adapter output, as transformers' Llama4VisionModel returns in last_hidden_state."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        hidden, tokens = config.hidden_size, config.patches_per_side**2 + 1
        self.patch_embedding = PatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(tokens, hidden))
        self.layernorm_pre = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.layernorm_post = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.model = VisionEncoder(config)
        self.vision_adapter = VisionAdapter(config)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, side, side] -> encoder output [N, S, Hv], class token last, before layernorm_post."""
        weight = self.patch_embedding.linear.weight
        _check_pixels(pixel_values, self.config)
        x: torch.Tensor = self.patch_embedding(pixel_values.to(device=weight.device, dtype=weight.dtype))  # [N, P, Hv]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [N, 1, Hv]
        x = self.layernorm_pre(torch.cat([x, cls], dim=1) + self.positional_embedding_vlm)  # [N, S, Hv]
        rot = vision_rotations(self.config, weight.device)  # [S, D/2]
        for layer in self.model.layers:
            x = layer(x, rot)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, side, side] -> [N, F, A]."""
        x = self.layernorm_post(self.encode(pixel_values))[:, :-1]  # [N, P, Hv], class token dropped
        adapted: torch.Tensor = self.vision_adapter(x)
        return adapted


class Projector(nn.Module):
    """Adapter output into the text model's hidden size: one bias-free linear."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_output_dim, config.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected: torch.Tensor = self.linear_1(x)
        return projected


class VisionTower(nn.Module):
    """The vision model and the projector: what turns tiles into embeddings for `<|patch|>` positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config)
        self.multi_modal_projector = Projector(config)

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, side, side] -> [N, F, H]: F = tokens_per_tile embeddings per tile, in order."""
        features: torch.Tensor = self.multi_modal_projector(self.vision_model(pixel_values))
        return features


def load_vision(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VisionTower:
    """The vision tower of a Llama4ForConditionalGeneration checkpoint directory (sharded or not)."""
    config = load_vision_config(path)
    checkpoint = Checkpoint(path)
    with torch.device("meta"):
        tower = VisionTower(config).to(dtype)
    tower.to_empty(device=device)
    params = dict(tower.named_parameters())
    missing = sorted(set(params) - checkpoint.names())
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} lacks {len(missing)} vision tensors, e.g. {missing[:3]}"
        )
    unused = sorted(n for n in checkpoint.names() - set(params) if n.startswith(_PREFIXES))
    if unused:
        log.warning("checkpoint %s has %d vision tensors the config does not use, e.g. %s",
                    checkpoint.directory, len(unused), unused[:3])
    for name, param in params.items():
        copy_checked(param, checkpoint.tensor(name), directory=checkpoint.directory, name=name)
    return tower.eval()


def load_vision_if_multimodal(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VisionTower | None:
    """The vision tower of a Llama4ForConditionalGeneration checkpoint, None for a text-only one."""
    return load_vision(path, dtype=dtype, device=device) if load_config(path).multimodal else None


def _check_pixels(pixel_values: torch.Tensor, config: VisionConfig) -> None:
    expected = (config.num_channels, config.image_size, config.image_size)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1:] != expected:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be [tiles, {', '.join(map(str, expected))}], got {shape}")
    if not pixel_values.dtype.is_floating_point:
        raise ValueError(f"pixel_values must be floating point (normalised), got dtype {pixel_values.dtype}")
