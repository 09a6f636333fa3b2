"""A request's stop strings, searched for in its growing text by looking only at what is new.

Invariant: the text only grows, and it is searched after every growth. A stop string wholly inside text
already searched would have been found then, so a new match ends in the new text and starts at most
(longest stop - 1) characters before it. A step costs O(stops x (new text + longest stop)), whatever the
length of the output; the number and length of stop strings are bounded in herd.engine.sampling_params.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """One request's stop strings and how much of its text has been searched for them."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(stop) for stop in self.stops), default=0)
        """Characters in the longest stop string (0: none)."""
        self._searched = 0  # characters of the text searched so far

    def find(self, text: str) -> tuple[int, str] | None:
        """The first stop string in the text that was not there at the last call, as (where it starts, which
        one): the earliest start wins; at one start, the shortest (it was complete first)."""
        if len(text) == self._searched:
            return None
        start = max(0, self._searched - self.longest + 1)
        self._searched = len(text)
        hits = [(index, stop) for stop in self.stops if (index := text.find(stop, start)) >= 0]
        return min(hits, key=lambda hit: (hit[0], len(hit[1])), default=None)

    def releasable(self, text: str) -> int:
        """How much of a text still being generated may be streamed: all but its last (longest stop - 1)
        characters, which could still become the start of a stop string."""
        return max(0, len(text) - max(0, self.longest - 1))
