"""Llama 4 vision configuration: the `vision_config` of a Llama4ForConditionalGeneration `config.json`.

Defaults follow transformers' `Llama4VisionConfig`, so a config that loads there means the same thing here.
The reference ties several widths together without checking them (the adapter's fc1 takes
`intermediate_size` inputs, the projector takes `vision_output_dim`); a config that breaks those ties
would fail inside the reference's forward, so it is refused here with the field named. Fields the
reference ignores (`norm_eps`, `hidden_act`, `multi_modal_projector_bias`) are accepted only at the
value it hard-codes, so a config never claims something neither side computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from herd.model.config import ModelConfig, _describe, read_config_json

# transformers' vision LayerNorms are nn.LayerNorm(hidden) with the default eps, whatever norm_eps says.
LAYER_NORM_EPS = 1e-5
_DEFAULT_ROPE_THETA = 10000.0


class VisionConfig(BaseModel):
    """The vision tower, its pixel-shuffle adapter and the projector into the text model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(768, gt=0, description="Hv: width of the vision encoder's residual stream")
    num_hidden_layers: int = Field(34, gt=0, description="vision encoder layers")
    num_attention_heads: int = Field(16, gt=0, description="attention heads per encoder layer")
    intermediate_size: int = Field(5632, gt=0, description="encoder MLP width; also the adapter's input")
    num_channels: int = Field(3, gt=0, description="colour channels of the pixel values")
    image_size: int = Field(448, gt=0, description="side of one square tile, in pixels")
    patch_size: int = Field(14, gt=0, description="side of one square patch, in pixels")
    rope_theta: float = Field(_DEFAULT_ROPE_THETA, gt=0, description="base wavelength of the 2-D rotary")
    pixel_shuffle_ratio: float = Field(0.5, gt=0, le=1, description="patch-grid downsampling per side")
    projector_input_dim: int = Field(4096, gt=0, description="adapter fc1 output width")
    projector_output_dim: int = Field(4096, gt=0, description="adapter fc2 output width")
    vision_output_dim: int = Field(7680, gt=0, description="projector input width (the adapter's output)")
    norm_eps: float = Field(LAYER_NORM_EPS, description="must be 1e-5: the reference's LayerNorms use it")
    hidden_act: Literal["gelu"] = Field("gelu", description="encoder and adapter activation (exact GELU)")
    multi_modal_projector_bias: Literal[False] = Field(False, description="the reference's projector has none")
    text_hidden_size: int = Field(gt=0, description="H: the projector's output, the text residual width")
    image_token_id: int = Field(200092, ge=0, description="<|patch|>: replaced by one image feature each")
    boi_token_id: int = Field(200080, ge=0, description="<|image_start|>")
    eoi_token_id: int = Field(200081, ge=0, description="<|image_end|>")

    @property
    def head_dim(self) -> int:
        """Width of one vision attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a tile (24 for 336-pixel tiles of 14-pixel patches)."""
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """s = 1 / pixel_shuffle_ratio: each s x s block of patches becomes one token."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Image features (and <|patch|> tokens) one tile yields: 144 for Scout and Maverick."""
        return (self.patches_per_side // self.shuffle_factor) ** 2

    @model_validator(mode="after")
    def _check_ties(self) -> VisionConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim (hidden_size / num_attention_heads = {self.head_dim}) must be a multiple of 4: "
                f"the 2-D rotary splits each head's complex pairs between x and y"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        s = self.shuffle_factor
        if abs(self.pixel_shuffle_ratio * s - 1) > 1e-9:
            raise ValueError(f"pixel_shuffle_ratio must be 1/s for an integer s, got {self.pixel_shuffle_ratio}")
        if self.patches_per_side % s:
            raise ValueError(
                f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} needs patches per side "
                f"(image_size / patch_size = {self.patches_per_side}) to be a multiple of {s}"
            )
        if self.intermediate_size != self.hidden_size * s * s:
            raise ValueError(
                f"intermediate_size {self.intermediate_size} must equal hidden_size / pixel_shuffle_ratio^2 = "
                f"{self.hidden_size * s * s}: the reference's adapter fc1 takes intermediate_size inputs"
            )
        if self.projector_input_dim != self.projector_output_dim:
            raise ValueError(
                f"projector_input_dim {self.projector_input_dim} must equal projector_output_dim "
                f"{self.projector_output_dim}: the reference's adapter fc2 is square"
            )
        if self.vision_output_dim != self.projector_output_dim:
            raise ValueError(
                f"vision_output_dim {self.vision_output_dim} must equal projector_output_dim "
                f"{self.projector_output_dim}: the projector takes the adapter's output"
            )
        if self.norm_eps != LAYER_NORM_EPS:
            raise ValueError(
                f"norm_eps must be {LAYER_NORM_EPS} (the reference's LayerNorms ignore it), got {self.norm_eps}"
            )
        return self

    @classmethod
    def from_hf(cls, raw: dict[str, Any], *, source: str = "config") -> VisionConfig:
        """Parse a whole Llama4ForConditionalGeneration config.json dict; ValueError naming `source`."""
        text = ModelConfig.from_hf(raw, source=source)  # validates the text part and the model type
        vision = raw.get("vision_config")
        if not text.multimodal or not isinstance(vision, dict):
            raise ValueError(
                f"{source}: vision_config is missing (model_type {raw.get('model_type')!r}): "
                f"this checkpoint has no vision tower"
            )
        try:
            return cls(
                **_vision_fields(vision),
                text_hidden_size=text.text.hidden_size,
                image_token_id=raw.get("image_token_index", 200092),
                boi_token_id=raw.get("boi_token_index", 200080),
                eoi_token_id=raw.get("eoi_token_index", 200081),
            )
        except ValidationError as err:
            raise ValueError(f"{source}: invalid Llama 4 vision config: {_describe(err)}") from err
        except ValueError as err:
            raise ValueError(f"{source}: vision_config: {err}") from err


def load_vision_config(path: str | Path) -> VisionConfig:
    """Read the vision part of `config.json` in a checkpoint directory (or the file itself)."""
    raw, source = read_config_json(path)
    return VisionConfig.from_hf(raw, source=source)


_PASSED_THROUGH = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
    "pixel_shuffle_ratio", "projector_input_dim", "projector_output_dim", "vision_output_dim", "norm_eps",
    "hidden_act", "multi_modal_projector_bias",
)


def _vision_fields(vision: dict[str, Any]) -> dict[str, Any]:
    """The fields Herd reads, from any transformers version's vision_config; unknown keys are ignored."""
    fields = {k: vision[k] for k in _PASSED_THROUGH if k in vision}
    for key in ("image_size", "patch_size"):
        if key in vision:
            fields[key] = _square(vision[key], key)
    fields["rope_theta"] = _rope_theta(vision)
    return fields


def _square(value: Any, key: str) -> Any:
    """transformers allows [h, w]; the reference's rotary table needs a square, so only [n, n] is accepted."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key} must be one integer or a square [n, n], got {value!r}")
        return value[0]
    return value


def _rope_theta(vision: dict[str, Any]) -> Any:
    """transformers 5 writes rope_parameters; older and Meta's configs write rope_theta."""
    params = vision.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type must be 'default' for the vision tower, got {rope_type!r}")
    theta = params.get("rope_theta")
    return vision.get("rope_theta", _DEFAULT_ROPE_THETA) if theta is None else theta
