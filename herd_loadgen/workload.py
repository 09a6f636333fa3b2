"""A fixed-seed workload of mixed prompt and output lengths: the same requests for every server compared."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Common English words: a tokenizer splits the rarer ones into several tokens, so prompts of equal word
# counts still differ in token counts.
_WORD_LIST = """
the of and to in is was for on that with as by at from his her they this which but be are had not have were
one all their there been has when who will more no if out so said what up its about into than them can only
other new some could time these two may then first any like now my over such our man me even most made after
also did many before must through back years where much your way well down should because each just those
people how too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since against go came
right used take three states himself few house use during without again place around however home small found
thought went say part once general high upon school every course does government mountain river kitchen
lantern harbor violin meadow glacier orchard canyon thunder whisper velvet compass parchment quartz saffron
falcon cathedral labyrinth nebula tundra archipelago symphony chrysanthemum kaleidoscope metamorphosis
photosynthesis juxtaposition onomatopoeia quintessential serendipity bureaucracy electromagnetic
"""
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True, kw_only=True)
class Request:
    """One request of a workload."""

    index: int
    """Position in the workload; records are reported in this order."""
    prompt: str
    """The user message (chat) or the prompt text (completions)."""
    max_tokens: int
    """Most tokens the server may generate for it."""


def make_workload(
    n: int, *, seed: int, prompt_words: tuple[int, int] = (8, 128), max_tokens: tuple[int, int] = (16, 64)
) -> list[Request]:
    """n requests, the same for the same arguments: word counts and max_tokens uniform over their ranges."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_range("prompt_words", prompt_words)
    _check_range("max_tokens", max_tokens)
    rng = random.Random(seed)
    requests = []
    for index in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words)))
        requests.append(Request(index=index, prompt=prompt, max_tokens=rng.randint(*max_tokens)))
    return requests


def _check_range(name: str, value: tuple[int, int]) -> None:
    ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 1 <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (lo, hi) integers with 1 <= lo <= hi, got {value!r}")

