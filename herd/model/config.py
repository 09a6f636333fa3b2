"""Llama 4 text configuration, read from a Hugging Face `config.json`.

Both layouts are accepted: `Llama4ForConditionalGeneration` (model_type "llama4", the text part under
`text_config`) and `Llama4ForCausalLM` (model_type "llama4_text", flat). Defaults and derived fields
follow transformers' `Llama4TextConfig`, so a config that loads there means the same thing here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from herd.model.quant.config import QuantizationConfig

LayerType = Literal["chunked_attention", "full_attention"]

_TEXT_MODEL_TYPES = {"llama4_text"}
_MULTIMODAL_MODEL_TYPES = {"llama4"}
_DEFAULT_ROPE_THETA = 500000.0


class RopeConfig(BaseModel):
    """Rotary embedding frequencies: plain, or with Llama 3.1-style long-context scaling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rope_type: Literal["default", "llama3"] = Field("default", description="frequency schedule")
    theta: float = Field(_DEFAULT_ROPE_THETA, gt=0, description="base wavelength of the frequencies")
    factor: float = Field(1.0, gt=0, description="llama3: how much low frequencies are stretched")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3: start of the smoothed band")
    high_freq_factor: float = Field(1.0, gt=0, description="llama3: end of the smoothed band")
    original_max_position_embeddings: int = Field(8192, gt=0, description="llama3: pretraining context")

    @model_validator(mode="after")
    def _check_bands(self) -> RopeConfig:
        # Equal factors (Scout ships 1.0 and 1.0) leave no band to blend, which is fine.
        if self.rope_type == "llama3" and self.high_freq_factor < self.low_freq_factor:
            raise ValueError(
                f"llama3 rope needs high_freq_factor >= low_freq_factor, got "
                f"{self.high_freq_factor} < {self.low_freq_factor}"
            )
        return self


class TextConfig(BaseModel):
    """The Llama 4 decoder: one code path for Scout (all MoE) and Maverick (interleaved dense/MoE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0, description="embedding rows and logits columns")
    hidden_size: int = Field(gt=0, description="H: residual stream width")
    intermediate_size: int = Field(gt=0, description="I: width of each routed and the shared expert")
    intermediate_size_mlp: int = Field(gt=0, description="width of the dense MLP on non-MoE layers")
    num_hidden_layers: int = Field(gt=0, description="decoder layers")
    num_attention_heads: int = Field(gt=0, description="query heads")
    num_key_value_heads: int = Field(gt=0, description="key/value heads (GQA groups)")
    head_dim: int = Field(gt=0, description="width of one attention head")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm and QK-norm epsilon")
    attention_bias: bool = Field(False, description="q/k/v/o projections carry a bias")
    num_local_experts: int = Field(gt=0, description="E: routed experts per MoE layer")
    num_experts_per_tok: int = Field(gt=0, description="k: experts chosen per token")
    moe_layers: tuple[int, ...] = Field(description="indices of the MoE layers; the rest are dense")
    use_rope: tuple[bool, ...] = Field(description="per layer: RoPE (+ QK norm) or NoPE")
    layer_types: tuple[LayerType, ...] = Field(description="per layer: chunked local or full causal")
    attention_chunk_size: int | None = Field(description="tokens per local-attention chunk")
    use_qk_norm: bool = Field(True, description="L2-normalise q and k after RoPE on RoPE layers")
    attn_temperature_tuning: bool = Field(True, description="scale queries with position on NoPE layers")
    floor_scale: float = Field(8192, gt=0, description="temperature tuning: tokens per log step")
    attn_scale: float = Field(0.1, description="temperature tuning: strength")
    rope: RopeConfig = Field(default_factory=RopeConfig, description="rotary embedding schedule")
    max_position_embeddings: int = Field(131072, gt=0, description="longest supported position")
    tie_word_embeddings: bool = Field(False, description="lm_head shares the embedding matrix")
    bos_token_id: int | None = Field(None, description="begin-of-text token")
    eos_token_ids: tuple[int, ...] = Field((), description="tokens that end generation")
    image_token_id: int | None = Field(
        None, ge=0, description="<|patch|>: its embeddings are replaced by image features; None: text only"
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> TextConfig:
        n = self.num_hidden_layers
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_local_experts "
                f"{self.num_local_experts}"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside 0..{n - 1}")
        if len(self.use_rope) != n or len(self.layer_types) != n:
            raise ValueError(
                f"no_rope_layers ({len(self.use_rope)}) and layer_types ({len(self.layer_types)}) "
                f"must give one entry for each of the {n} layers"
            )
        if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
            raise ValueError("layer_types has chunked_attention layers but attention_chunk_size is null")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ValueError(f"attention_chunk_size must be positive, got {self.attention_chunk_size}")
        specials = (self.bos_token_id, *self.eos_token_ids)
        bad_ids = [t for t in specials if t is not None and not 0 <= t < self.vocab_size]
        if bad_ids:
            raise ValueError(f"special token ids {bad_ids} are outside the vocabulary of {self.vocab_size}")
        return self

    def is_moe(self, layer: int) -> bool:
        """Whether `layer` routes to experts (else it is a dense MLP of intermediate_size_mlp)."""
        return layer in self.moe_layers

    def chunk_size(self, layer: int) -> int | None:
        """Local-attention chunk of `layer`, or None for full causal attention."""
        return self.attention_chunk_size if self.layer_types[layer] == "chunked_attention" else None

    @classmethod
    def from_hf(cls, text: dict[str, Any], *, image_token_id: int | None = None) -> TextConfig:
        """Map a Hugging Face Llama4TextConfig dict (any transformers version) onto this config.

        `image_token_id` comes from the enclosing multimodal config (`image_token_index`), not the text part.
        """
        n = _require_int(text, "num_hidden_layers")
        heads = _require_int(text, "num_attention_heads")
        hidden = _require_int(text, "hidden_size")
        head_dim = text.get("head_dim", 128) or hidden // heads  # transformers: 128 unless given, null derives
        step = text.get("interleave_moe_layer_step", 1)
        moe_layers = text.get("moe_layers")
        if moe_layers is None:
            if not isinstance(step, int) or step <= 0:
                raise ValueError(f"interleave_moe_layer_step must be a positive integer, got {step!r}")
            moe_layers = list(range(step - 1, n, step))
        interval = text.get("no_rope_layer_interval", 4)
        no_rope_layers = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        if len(no_rope_layers) < n:
            raise ValueError(f"no_rope_layers has {len(no_rope_layers)} entries for {n} layers")
        use_rope = tuple(bool(flag) for flag in no_rope_layers[:n])
        chunk = text.get("attention_chunk_size", 8192)
        layer_types = text.get("layer_types") or [
            "chunked_attention" if rope and chunk is not None else "full_attention" for rope in use_rope
        ]
        eos = text.get("eos_token_id", 2)
        return cls(
            vocab_size=_require_int(text, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_require_int(text, "intermediate_size"),
            intermediate_size_mlp=text.get("intermediate_size_mlp", 16384),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads", 8) or heads,
            head_dim=head_dim,
            rms_norm_eps=text.get("rms_norm_eps", 1e-5),
            attention_bias=text.get("attention_bias", False),
            num_local_experts=text.get("num_local_experts", 16),
            num_experts_per_tok=text.get("num_experts_per_tok", 1),
            moe_layers=tuple(moe_layers),
            use_rope=use_rope,
            layer_types=tuple(layer_types[:n]),
            attention_chunk_size=chunk,
            use_qk_norm=text.get("use_qk_norm", True),
            attn_temperature_tuning=text.get("attn_temperature_tuning", True),
            floor_scale=text.get("floor_scale", 8192),
            attn_scale=text.get("attn_scale", 0.1),
            rope=_rope_from_hf(text),
            max_position_embeddings=text.get("max_position_embeddings", 131072),
            tie_word_embeddings=text.get("tie_word_embeddings", False),
            bos_token_id=text.get("bos_token_id", 1),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            image_token_id=image_token_id,
        )


class ModelConfig(BaseModel):
    """A Llama 4 checkpoint's configuration: the text decoder plus what surrounds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: TextConfig = Field(description="the decoder Herd runs")
    multimodal: bool = Field(description="the checkpoint is Llama4ForConditionalGeneration (vision tower too)")
    quantization: QuantizationConfig | None = Field(None, description="int4 or FP8 weights; None: all bf16")

    @property
    def image_token_id(self) -> int | None:
        """The <|patch|> token that image embeddings replace (the decoder holds it: text.image_token_id)."""
        return self.text.image_token_id

    @classmethod
    def from_hf(cls, raw: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Parse a config.json dict; ValueError naming `source` if it is not a valid Llama 4 config."""
        model_type = raw.get("model_type")
        if model_type not in _TEXT_MODEL_TYPES | _MULTIMODAL_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} (architectures {raw.get('architectures')}) is not "
                f"Llama 4; Herd serves model_type 'llama4' or 'llama4_text'"
            )
        quantization = None
        if raw.get("quantization_config") is not None:
            if not isinstance(raw["quantization_config"], dict):
                raise ValueError(f"{source}: quantization_config must be an object")
            try:
                quantization = QuantizationConfig.from_hf(raw["quantization_config"])
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from err
        multimodal = model_type in _MULTIMODAL_MODEL_TYPES
        text = raw.get("text_config") if multimodal else raw
        if not isinstance(text, dict):
            raise ValueError(f"{source}: model_type 'llama4' needs a text_config object, got {type(text).__name__}")
        if multimodal and "tie_word_embeddings" not in text and "tie_word_embeddings" in raw:
            text = {**text, "tie_word_embeddings": raw["tie_word_embeddings"]}
        try:
            return cls(
                text=TextConfig.from_hf(text, image_token_id=raw.get("image_token_index") if multimodal else None),
                multimodal=multimodal,
                quantization=quantization,
            )
        except ValidationError as err:
            raise ValueError(f"{source}: invalid Llama 4 config: {_describe(err)}") from err
        except TypeError as err:
            raise ValueError(f"{source}: invalid Llama 4 config: {err}") from err
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


def read_config_json(path: str | Path) -> tuple[dict[str, Any], str]:
    """The JSON object in `config.json` of a checkpoint directory (or the file itself), and where it was."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    return read_json_object(file), str(file)


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; ValueError naming the file if it is not one."""
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    raw, source = read_config_json(path)
    return ModelConfig.from_hf(raw, source=source)


def _describe(err: ValidationError) -> str:
    """Pydantic's errors as one short line each, without echoing the whole input back."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg} (got {e['input']!r})" if where else msg)
    return "; ".join(parts)


def _require_int(d: dict[str, Any], key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _rope_from_hf(text: dict[str, Any]) -> RopeConfig:
    """transformers 5 writes `rope_parameters`; older configs and Meta's write rope_theta + rope_scaling."""
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None) or text.get("rope_theta") or _DEFAULT_ROPE_THETA
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not used by Llama 4 (default or llama3)")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {missing}")
    return RopeConfig(
        rope_type="llama3",
        theta=theta,
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params.get(
            "original_max_position_embeddings", text.get("max_position_embeddings", 131072)
        ),
    )
