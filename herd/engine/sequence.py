"""One request's state as it moves through the engine.

Invariant (the scheduler's only rule): a sequence's known tokens are its prompt plus everything it has
generated; `num_computed` of them have KV entries. Each step gives it some of the difference; when
computed catches up with known, the step also samples its next token. A prefill, a chunk of one, a
decode and a recompute after preemption are all this same catch-up.
"""

from __future__ import annotations

import enum
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from herd.engine.errors import HerdError
from herd.engine.grammar import Grammar
from herd.engine.prompt_images import ImageSpan, PromptImages
from herd.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from herd.engine.sampler import TokenLogprobs  # a type only: the scheduler's side imports no torch

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # no KV blocks held (new, or preempted)
    RUNNING = "running"  # holds KV blocks for its computed tokens
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request: its tokens, where its computation stands, who sent it, and how it ends."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tenant_id: str = "default"
    tenant_weight: float = 1.0
    cache_salt: str = ""
    """Prefix-cache namespace: the tenant id, or a sharing group that several tenants opted into (and the LoRA
    adapter's registration, when the request names one)."""
    adapter: str | None = None
    """The registered LoRA adapter the request runs with (None: the base model)."""
    stop_ids: frozenset[int] = frozenset()
    """Token ids that finish this sequence (model end tokens unless ignore_eos, plus stop_token_ids)."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """The params' bad_words as token sequences (each word as it stands and after a space)."""
    grammar: Grammar | None = None
    """Where the output stands in the params' structured constraint (None: unconstrained)."""
    images: PromptImages | None = None
    """The prompt's images (features for its placeholders), kept until the sequence finishes: a preempted
    sequence recomputes its prompt."""
    output_ids: list[int] = field(default_factory=list)
    index: int = 0
    """Which choice of its request this is (n > 1 or best_of); 0 for the first, and for a request of one."""
    forks: list[Sequence] = field(default_factory=list)
    """The request's other choices, forked from this one once its prompt is computed (herd.engine.request_group);
    empty after that, and for a request of one."""
    cumulative_logprob: float = 0.0
    """Sum of the model's log-probabilities of its tokens so far, where the sampler gave them (logprobs asked, or
    best_of ranking)."""
    num_pending: int = 0
    """Tokens being sampled by a step still in flight (0 or 1; async scheduling): known to come, not yet known."""
    token_limit: int = sys.maxsize
    """Known tokens at which the sequence ends by length: min(prompt + max_tokens, the context limit)."""
    draft_ids: list[int] = field(default_factory=list)
    """Tokens proposed to follow the known ones (speculative decoding), verified by the next step that computes
    them; never known tokens: only what the target model agrees with becomes output."""
    draft_tokens: int = 0
    """Speculative decoding so far: drafts verified, drafts the model agreed with, steps that verified drafts."""
    accepted_tokens: int = 0
    verify_steps: int = 0
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: HerdError | None = None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    num_cached_prompt_tokens: int = 0
    """Prompt tokens served from the prefix cache at admission (the last admission, after preemption)."""
    arrived_ns: int = field(default_factory=time.time_ns)
    """Wall-clock times (ns since the epoch, as trace spans take them): arrival, first scheduled, first
    token, finished; 0 until they happen."""
    scheduled_ns: int = 0
    first_token_ns: int = 0
    finished_ns: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """The prompt tokens scored so far, from the first (None: nothing precedes it), when the params ask for
    prompt logprobs (herd.engine.prompt_logprobs); None when they do not."""

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def draw_position(self) -> int:
        """The output position of its next sampled token as seeded draws key it: the tokens it generated here, after
        those of an earlier replica it continues (SamplingParams.output_offset)."""
        return self.params.output_offset + len(self.output_ids)

    @property
    def num_known(self) -> int:
        """Prompt, output, and the tokens a step in flight is sampling."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def ends_in_flight(self) -> bool:
        """The token a step in flight is sampling will be the last (by length): nothing to schedule after it."""
        return self.num_pending > 0 and self.num_known >= self.token_limit

    @property
    def cacheable_tokens(self) -> int:
        """Known tokens the prefix cache may serve at admission: all of them, but while the prompt logprobs
        are not all scored only the positions already scored (a cached position computes no logits)."""
        scored = self.prompt_logprobs
        if scored is None or len(scored) >= len(self.prompt_ids):
            return self.num_known
        return len(scored) - 1

    def token_ids(self) -> list[int]:
        """Every known token: prompt then output."""
        return self.prompt_ids + self.output_ids

    @property
    def image_spans(self) -> tuple[ImageSpan, ...]:
        return self.images.spans if self.images is not None else ()

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
