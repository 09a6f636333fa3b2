"""An EAGLE-3 draft head's configuration, read from its `config.json` (the layout vLLM, SGLang and SpecForge load).

The head is one Llama decoder layer (Llama 3 style: rotate-half RoPE, no QK norm, full causal attention) whose
attention reads twice its width: the token's embedding beside a hidden state. What it needs besides a Llama config:
- `vocab_size`: the target's vocabulary (its embedding rows, when it has its own); `draft_vocab_size`: the rows of
  its LM head, a subset of the target's ids mapped back by the `d2t` tensor (absent: the target's whole vocabulary).
- the target layers whose hidden states it reads: `eagle_aux_hidden_state_layer_ids` at the top level or under
  `eagle_config`, meaning the hidden state *entering* each layer (as vLLM captures them), concatenated low to high;
  absent, vLLM's default for a target of L layers: (2, L // 2, L - 3).
- `target_hidden_size`: the target's width when it differs from the head's (the input width of `fc` is then
  3 x target_hidden_size).
- `norm_before_residual`: the residual is the normed hidden state rather than the raw one (some SpecForge heads).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from herd.model.config import RopeConfig, _describe, _rope_from_hf

DEFAULT_ROPE_THETA = 10000.0
"""transformers' LlamaConfig default, for a head config that names no rope_theta."""


class Eagle3Config(BaseModel):
    """One EAGLE-3 head: its decoder layer's shape, its vocabularies and the target layers it reads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(gt=0, description="H: the head's width (its fc output, attention and MLP)")
    num_attention_heads: int = Field(gt=0, description="query heads")
    num_key_value_heads: int = Field(gt=0, description="key/value heads (GQA groups)")
    head_dim: int = Field(gt=0, description="width of one attention head (default H / heads)")
    intermediate_size: int = Field(gt=0, description="width of the SwiGLU MLP")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon")
    rope: RopeConfig = Field(description="rotary schedule (rope_theta, llama3 rope_scaling)")
    vocab_size: int = Field(gt=0, description="the target's vocabulary: embedding rows, d2t's target ids")
    draft_vocab_size: int = Field(gt=0, description="rows of the head's LM head")
    target_hidden_size: int | None = Field(None, gt=0, description="the target's width when it is not H")
    aux_layer_ids: tuple[int, ...] | None = Field(None, description="target layers whose entering hidden states "
                                                  "the head reads, low to high; None: vLLM's default")
    norm_before_residual: bool = Field(False, description="the residual is hidden_norm(hidden), not hidden")

    def aux_layers(self, num_target_layers: int) -> tuple[int, ...]:
        """The target layers read, low to high (the order the target's forward meets them)."""
        if self.aux_layer_ids is not None:
            return tuple(sorted(self.aux_layer_ids))
        return tuple(sorted((2, num_target_layers // 2, num_target_layers - 3)))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], *, source: str = "config") -> Eagle3Config:
        """Parse a head's config.json dict; ValueError naming `source` if it is not an EAGLE-3 Llama head."""
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list) or not any("eagle3" in str(a).lower() for a in architectures):
            raise ValueError(f"{source}: architectures {architectures!r} name no EAGLE-3 head (expected e.g. "
                             f"LlamaForCausalLMEagle3 or Eagle3LlamaForCausalLM)")
        layers = raw.get("num_hidden_layers", 1)
        if layers != 1:
            raise ValueError(f"{source}: num_hidden_layers {layers!r}: Herd runs EAGLE-3 heads of one decoder layer")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{source}: {flag} is set; Herd's EAGLE-3 head has no biases")
        eagle = raw.get("eagle_config") or {}
        if not isinstance(eagle, dict):
            raise ValueError(f"{source}: eagle_config must be an object, got {type(eagle).__name__}")
        if eagle.get("use_aux_hidden_state") is False:
            raise ValueError(f"{source}: eagle_config.use_aux_hidden_state is false (an EAGLE-1/2 head); "
                             f"Herd runs EAGLE-3 heads, which read the target's aux hidden states")
        aux = raw.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        try:
            hidden = raw.get("hidden_size")
            heads = raw.get("num_attention_heads")
            head_dim = raw.get("head_dim")
            if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
                head_dim = hidden // heads
            vocab = raw.get("vocab_size")
            rope_source = raw if raw.get("rope_theta") or raw.get("rope_parameters") else {
                **raw, "rope_theta": DEFAULT_ROPE_THETA}
            return cls(
                hidden_size=hidden,
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                intermediate_size=raw.get("intermediate_size"),
                rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                rope=_rope_from_hf(rope_source),
                vocab_size=vocab,
                draft_vocab_size=raw.get("draft_vocab_size") or vocab,
                target_hidden_size=raw.get("target_hidden_size"),
                aux_layer_ids=tuple(aux) if aux else None,
                norm_before_residual=bool(raw.get("norm_before_residual", False)),
            )
        except ValidationError as err:
            raise ValueError(f"{source}: invalid EAGLE-3 config: {_describe(err)}") from err
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: invalid EAGLE-3 config: {err}") from err
