"""Incremental detokenisation that never splits a UTF-8 character between streamed pieces.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix yields
U+FFFD. The text of the last few tokens is decoded together, and new text is released only when the
decoded window no longer ends in an incomplete character.
"""

from __future__ import annotations

from herd.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # tokens decoded before the unreleased ones, so merges across the boundary decode right


class IncrementalDetokenizer:
    """Turns one sequence's growing list of token ids into text pieces, released when complete."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.text = ""
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens whose text has been released

    def push(self, token_ids: list[int]) -> str:
        """All tokens so far (the new ones at the end) -> the text newly complete since last time."""
        before = self.tokenizer.decode(token_ids[self._prefix_offset : self._read_offset],
                                       skip_special_tokens=self.skip_special)
        after = self.tokenizer.decode(token_ids[self._prefix_offset :], skip_special_tokens=self.skip_special)
        if after.endswith(_REPLACEMENT) or len(after) <= len(before):
            return ""
        delta = after[len(before) :]
        self.text += delta
        self._read_offset = len(token_ids)
        self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        return delta

    def flush(self, token_ids: list[int]) -> str:
        """At the end: whatever is left, incomplete characters included (as U+FFFD)."""
        rest = self.tokenizer.decode(token_ids[self._prefix_offset :], skip_special_tokens=self.skip_special)
        done = self.tokenizer.decode(token_ids[self._prefix_offset : self._read_offset],
                                     skip_special_tokens=self.skip_special)
        delta = rest[len(done) :]
        self.text += delta
        self._read_offset = len(token_ids)
        return delta
