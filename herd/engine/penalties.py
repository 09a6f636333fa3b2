"""What a request's own tokens do to its next token's logits: repetition, frequency and presence penalties, its
logit bias, and min_tokens' mask of its end tokens. Applied to the rows that ask, in one pass each over a step.

Legend: B rows that sample this step, P of them penalised or biased, V vocab.

In this order, as transformers and vLLM apply them: repetition_penalty (tokens seen in the prompt or output: a
positive logit divided by it, a negative one multiplied), then OpenAI's frequency and presence penalties over the
output (logit - count * frequency - [count > 0] * presence), then logit_bias (added), then min_tokens (the row's
end tokens at -inf while it has generated fewer) and bad_words (a token that would complete a banned token
sequence at -inf). Counts are built each step from the rows' token lists, one copy
to the device of the ids they hold (O(tokens of the penalised rows)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from herd.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class History:
    """What a row's penalties read: its prompt, its tokens so far, and the tokens that would end it."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    stop_ids: frozenset[int]
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences never to complete (the request's bad_words, tokenized by the engine)."""


def needs_history(params: SamplingParams) -> bool:
    """Whether the row's logits change with anything but the model: penalties, min_tokens or a logit bias."""
    return params.penalised or bool(params.logit_bias)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[History | None],
                    ) -> torch.Tensor:
    """The logits [B, V] the rows sample from: a copy with the asking rows changed, or `logits` itself when none
    asks. histories[i] is row i's (None only where needs_history(params[i]) is False)."""
    rows = [row for row, p in enumerate(params) if needs_history(p)]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    out = logits.clone()
    index = torch.tensor(rows, dtype=torch.int64, device=device)  # [P]
    picked = out[index]  # [P, V]
    history = [_history(histories, row) for row in rows]
    penalised = [params[row] for row in rows]
    counts = _counts([h.output_ids for h in history], vocab, device)  # [P, V] float32
    repetition = torch.tensor([p.repetition_penalty for p in penalised], dtype=out.dtype, device=device)  # [P]
    if bool((repetition != 1.0).any()):
        seen = (_counts([h.prompt_ids for h in history], vocab, device) + counts) > 0  # [P, V]
        scaled = torch.where(picked > 0, picked / repetition[:, None], picked * repetition[:, None])
        picked = torch.where(seen, scaled, picked)
    frequency = torch.tensor([p.frequency_penalty for p in penalised], dtype=out.dtype, device=device)  # [P]
    presence = torch.tensor([p.presence_penalty for p in penalised], dtype=out.dtype, device=device)  # [P]
    picked = picked - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(out.dtype)
    bias = [(i, token, value) for i, p in enumerate(penalised) for token, value in p.logit_bias]
    if bias:
        at = torch.tensor([[i, token] for i, token, _ in bias], dtype=torch.int64, device=device)  # [n, 2]
        values = torch.tensor([value for _, _, value in bias], dtype=out.dtype, device=device)  # [n]
        picked = picked.index_put((at[:, 0], at[:, 1]), values, accumulate=True)
    ending = [(i, token) for i, (p, h) in enumerate(zip(penalised, history, strict=True))
              if len(h.output_ids) < p.min_tokens for token in h.stop_ids if token < vocab]
    ending += [(i, token) for i, h in enumerate(history) for token in _completing(h)]
    if ending:
        at = torch.tensor(ending, dtype=torch.int64, device=device)  # [n, 2]
        picked = picked.index_put((at[:, 0], at[:, 1]), torch.tensor(float("-inf"), device=device))
    out[index] = picked
    return out


def _completing(history: History) -> set[int]:
    """The tokens that would complete one of the row's bad words now: each word's last token, where the output
    ends with the rest of it."""
    out = history.output_ids
    return {word[-1] for word in history.bad_words
            if len(word) - 1 <= len(out) and tuple(out[len(out) - len(word) + 1 :]) == word[:-1]}


def _history(histories: Sequence[History | None], row: int) -> History:
    history = histories[row]
    if history is None:
        raise ValueError(f"row {row} has penalties, a logit bias or min_tokens but no history was given")
    return history


def _counts(ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's ids: [P, V] float32."""
    counts = torch.zeros(len(ids), vocab, dtype=torch.float32, device=device)
    rows = [row for row, tokens in enumerate(ids) for _ in tokens]
    if rows:
        flat = [token for tokens in ids for token in tokens]
        at = torch.tensor([rows, flat], dtype=torch.int64, device=device)  # [2, n]
        counts.index_put_((at[0], at[1]), torch.ones(len(flat), device=device), accumulate=True)
    return counts


__all__ = ["History", "apply_penalties", "needs_history"]
