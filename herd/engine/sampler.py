"""Choosing each sequence's next token from its logits: greedy, or temperature with top-k, top-p and
min-p, drawn from the request's own generator; plus log-probabilities when asked.

Legend: V vocab. Log-probabilities are those of the model's distribution (log-softmax of the raw
logits), the chosen token's and the top-n alternatives', whatever the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the most likely alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, TokenLogprobs | None]:
    """Next token for one sequence from float32 logits [V]."""
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(_filtered(logits / params.temperature, params), dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return token, None
    logprobs = torch.log_softmax(logits, dim=-1)
    top_values, top_ids = torch.topk(logprobs, params.logprobs) if params.logprobs else (logprobs[:0], logprobs[:0])
    top = tuple(zip(top_ids.tolist(), top_values.tolist(), strict=True))
    return token, TokenLogprobs(token_id=token, logprob=float(logprobs[token]), top=top)


def _filtered(scaled: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits with the tokens top-k, top-p and min-p exclude set to -inf."""
    out = scaled.clone()
    if params.top_k and params.top_k < out.shape[-1]:
        kth = torch.topk(out, params.top_k).values[-1]
        out[out < kth] = float("-inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        out[order[drop]] = float("-inf")
    if params.min_p > 0.0:
        probs = torch.softmax(out, dim=-1)
        out[probs < params.min_p * probs.max()] = float("-inf")
    return out


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator when the request gives a seed (samples then repeat exactly)."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)
