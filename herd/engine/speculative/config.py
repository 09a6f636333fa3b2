"""The speculative section of a model's engine settings (EngineConfig.speculative)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_DRAFT_TOKENS = 16
"""Most draft tokens one sequence may verify in a step."""


class SpeculativeConfig(BaseModel):
    """How the engine proposes draft tokens; every request speculates unless it opts out (SamplingParams)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["ngram", "eagle3"] = Field(description="ngram: prompt lookup (continuations found in the "
                                               "prompt and output so far, no draft model); eagle3: an EAGLE-3 draft "
                                               "head fed the target's hidden states (draft_path)")
    num_tokens: int = Field(3, ge=1, le=MAX_DRAFT_TOKENS, description="draft tokens per sequence per step at most "
                            "(k); ngram adapts each sequence's k below it from its acceptance")
    draft_path: str | None = Field(None, description="eagle3: the draft head's checkpoint directory (config.json "
                                   "and safetensors in the published EAGLE-3 layout)")
    prompt_lookup_min: int = Field(2, ge=1, description="ngram: the shortest suffix of the tokens so far that is "
                                   "looked up")
    prompt_lookup_max: int = Field(4, ge=1, description="ngram: the longest suffix looked up (longer are tried "
                                   "first)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.method == "eagle3" and not self.draft_path:
            raise ValueError("speculative.method eagle3 needs speculative.draft_path (the EAGLE-3 head's directory)")
        if self.method == "ngram" and self.draft_path is not None:
            raise ValueError("speculative.draft_path is for method eagle3; ngram uses no draft model")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative.prompt_lookup_min {self.prompt_lookup_min} is above prompt_lookup_max "
                             f"{self.prompt_lookup_max}")
        return self
