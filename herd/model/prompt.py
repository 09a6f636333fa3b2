"""A completion prompt as token ids: what the engine and the gateway both accept, checked the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard

from herd.model.special_tokens import BEGIN_OF_TEXT
from herd.model.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def prompt_ids(tokenizer: Tokenizer, prompt: object, vocab_size: int) -> list[int]:
    """Text is encoded with <|begin_of_text|> first (unless it starts with it); token ids are taken as they are,
    each in 0..vocab_size-1. ValueError saying what is wrong: the prompt is empty, not text or ids, or an id is
    outside the vocabulary."""
    prompt = as_prompt(prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        return tokenizer.encode(prompt, add_bos=not prompt.startswith(BEGIN_OF_TEXT))
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}")
    return ids


def as_prompt(value: object) -> str | list[int] | tuple[int, ...]:
    """The value as a prompt (text, or a list or tuple of token ids); ValueError when it is neither."""
    if isinstance(value, str) or is_token_list(value):
        return value
    raise ValueError(f"prompt must be a string or a list of token ids, got {type(value).__name__}")


def is_token_list(value: object) -> TypeGuard[list[int] | tuple[int, ...]]:
    """A list or tuple of ints (bools excluded): a prompt given as token ids."""
    return isinstance(value, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
