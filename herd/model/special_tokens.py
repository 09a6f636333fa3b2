"""Llama 4's special tokens, in the order Meta's tokenizer appends them after the BPE vocabulary.

Invariant: a token's id is ``bpe_vocab_size + SPECIAL_TOKENS.index(token)``. In the real model the BPE
vocabulary has 200000 tokens, so ``<|begin_of_text|>`` is 200000, ``<|eot|>`` 200008 and ``<|patch|>``
200092; tiny test models append exactly these 93 tokens after their own BPE vocabulary so the relative
layout is the same. (The real tokenizer goes on with 1034 more reserved vision and reasoning tokens; no
code here names them.) The reserved text tokens are numbered 6..66 as in the Hugging Face conversion.
"""

from __future__ import annotations

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"

HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
EOM = "<|eom|>"
EOT = "<|eot|>"
STEP = "<|step|>"
PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
FINETUNE_RIGHT_PAD = "<|finetune_right_pad|>"

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
TILE_X_SEPARATOR = "<|tile_x_separator|>"
TILE_Y_SEPARATOR = "<|tile_y_separator|>"
IMAGE = "<|image|>"
PATCH = "<|patch|>"


def _reserved(name: str, *, start: int, count: int) -> tuple[str, ...]:
    """Reserved token strings ``<|{name}_reserved_special_token_{i}|>`` for i in [start, start + count)."""
    return tuple(f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count))


# Offsets 0..4.
BASIC_SPECIAL_TOKENS: tuple[str, ...] = (BEGIN_OF_TEXT, END_OF_TEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)

# Offsets 5..79.
TEXT_POST_TRAIN_SPECIAL_TOKENS: tuple[str, ...] = (
    HEADER_START,
    HEADER_END,
    EOM,
    EOT,
    STEP,
    *_reserved("text_post_train", start=0, count=6),
    PYTHON_START,
    PYTHON_END,
    FINETUNE_RIGHT_PAD,
    *_reserved("text_post_train", start=6, count=61),
)

# Offsets 80..92: the named head of the vision block.
VISION_SPECIAL_TOKENS: tuple[str, ...] = (
    IMAGE_START,
    IMAGE_END,
    *_reserved("vision", start=0, count=2),
    TILE_X_SEPARATOR,
    TILE_Y_SEPARATOR,
    *_reserved("vision", start=2, count=4),
    IMAGE,
    *_reserved("vision", start=6, count=1),
    PATCH,
)

SPECIAL_TOKENS: tuple[str, ...] = BASIC_SPECIAL_TOKENS + TEXT_POST_TRAIN_SPECIAL_TOKENS + VISION_SPECIAL_TOKENS
"""All 93 tokens, offset ``i`` at index ``i``."""

STOP_TOKENS: tuple[str, ...] = (END_OF_TEXT, EOM, EOT)
"""Generation stops at any of these (Meta's ``stop_tokens``; the instruct checkpoints' eos ids)."""

LLAMA4_BPE_VOCAB_SIZE = 200_000
"""Number of BPE tokens before the first special token in the real Llama 4 tokenizer."""


def special_token_offset(token: str) -> int:
    """Position of ``token`` after the BPE vocabulary (``<|eot|>`` -> 8); ``ValueError`` if not special."""
    try:
        return SPECIAL_TOKENS.index(token)
    except ValueError:
        raise ValueError(f"{token!r} is not one of Llama 4's {len(SPECIAL_TOKENS)} named special tokens") from None
