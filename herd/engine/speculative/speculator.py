"""The engine's side of speculative decoding: which sequences get drafts and how many, the proposer that makes
them, and each sequence's adaptive draft length.

A sequence is drafted for when it is decoding (its next step computes one known token), its request has not opted
out (SamplingParams.speculative), and there is room: k drafts may add k + 1 tokens, so k stays below its
remaining tokens. A constrained sequence's drafts are cut where its grammar would refuse one (they could never be
accepted, and the masks of the rows after one cannot be made).

k adapts to what the sequence's drafts earn: an estimate of the chance a draft is accepted (accepted drafts over
accepted drafts plus rejections, decayed so recent steps count most) gives the expected run of accepted drafts,
a / (1 - a), and k follows it between 1 and num_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from herd.engine.kv_cache_manager import FULL, KVCacheManager
from herd.engine.paged_kv import PagedKVCache, layer_bytes_per_block
from herd.engine.sequence import Sequence, Status
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.speculative.ngram import NgramProposer
from herd.engine.speculative.proposer import Proposer, StepRows
from herd.model.config import read_config_json
from herd.model.llama4 import Llama4Model

DECAY = 0.8
"""Weight of the earlier steps in a sequence's acceptance estimate, per verifying step."""


@dataclass
class Acceptance:
    """A sequence's decayed counts of accepted drafts and of rejections."""

    accepted: float
    rejected: float = 1.0

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)

    def draft_length(self, most: int) -> int:
        """The expected run of accepted drafts, a / (1 - a) = accepted / rejected, within 1..most."""
        return max(1, min(most, round(self.accepted / max(self.rejected, 1e-6))))


class Speculator:
    """Owns the proposer and the per-sequence draft lengths of one engine."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        self._acceptance: dict[str, Acceptance] = {}

    @classmethod
    def build(cls, config: SpeculativeConfig, model: Llama4Model, kv: KVCacheManager,
              cache: PagedKVCache) -> Speculator:
        """The speculator of the configured method (an EAGLE-3 head is loaded, and checked against the model)."""
        if config.method == "ngram":
            return cls(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
        from herd.engine.speculative.eagle3 import Eagle3Proposer  # torch modules only an eagle3 engine needs

        assert config.draft_path is not None  # the config's own check
        return cls(config, Eagle3Proposer.from_path(config.draft_path, model, kv, cache))

    @staticmethod
    def kv_bytes_per_block(config: SpeculativeConfig, block_size: int, kv_dtype: torch.dtype) -> dict[str, int]:
        """What the proposer adds to each KV block of a group (an EAGLE-3 head's layer on the full group), so the
        engine's KV budget counts it; read from the head's config before anything is loaded."""
        if config.method != "eagle3":
            return {}
        from herd.model.eagle3_config import Eagle3Config

        assert config.draft_path is not None
        raw, source = read_config_json(config.draft_path)
        head = Eagle3Config.from_hf(raw, source=source)
        return {FULL: layer_bytes_per_block(block_size, head.num_key_value_heads, head.head_dim, kv_dtype)}

    @property
    def aux_layers(self) -> tuple[int, ...]:
        return self.proposer.aux_layers

    def after_step(self, step: StepRows, running: Iterable[Sequence]) -> None:
        """Hand the step to the proposer and give every running sequence its drafts for the next step (none for
        those not drafted for)."""
        wanted: list[tuple[Sequence, int]] = []
        for seq in running:
            seq.draft_ids = []
            k = self._length(seq)
            if k > 0:
                wanted.append((seq, k))
        drafts = self.proposer.propose(step, wanted)
        for (seq, k), proposed in zip(wanted, drafts, strict=True):
            proposed = proposed[:k]
            if seq.grammar is not None and proposed:
                proposed = proposed[: seq.grammar.matcher.validate_tokens(proposed)]
            seq.draft_ids = proposed

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """A step verified `drafted` of seq's drafts and the model agreed with the first `accepted`."""
        self._estimate(seq).update(drafted, accepted)

    def forget(self, seq: Sequence) -> None:
        self._acceptance.pop(seq.request_id, None)
        self.proposer.forget(seq)

    def _length(self, seq: Sequence) -> int:
        """Drafts for seq's next step: 0 unless it decodes and speculates, else its adaptive length within the
        tokens it has left."""
        if seq.status is not Status.RUNNING or not seq.params.speculative or seq.num_computed != seq.num_known - 1:
            return 0
        room = seq.token_limit - seq.num_known - 1
        return min(room, self._estimate(seq).draft_length(self.config.num_tokens))

    def _estimate(self, seq: Sequence) -> Acceptance:
        estimate = self._acceptance.get(seq.request_id)
        if estimate is None:  # a prior that starts at num_tokens drafts
            estimate = self._acceptance[seq.request_id] = Acceptance(accepted=float(self.config.num_tokens))
        return estimate
