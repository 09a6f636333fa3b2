"""Which sequences are drafted for, how many drafts they get (adaptive, within the tokens they have left, cut at
what their grammar refuses), and what the proposer is handed."""

from __future__ import annotations

from herd.engine.sampling_params import SamplingParams
from herd.engine.sequence import Sequence, Status
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.speculative.proposer import StepRows
from herd.engine.speculative.speculator import Acceptance, Speculator


class Recorder:
    aux_layers: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.wanted: list[tuple[str, int]] = []
        self.forgotten: list[str] = []

    def propose(self, step, wanted):
        self.wanted = [(seq.request_id, k) for seq, k in wanted]
        return [[7] * (k + 2) for _, k in wanted]  # more than asked: cut to k

    def forget(self, seq) -> None:
        self.forgotten.append(seq.request_id)


def _decoding(rid, *, max_tokens=50, speculative=True, output=3):
    seq = Sequence(request_id=rid, prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=max_tokens,
                                                                               speculative=speculative))
    seq.output_ids = [9] * output
    seq.token_limit = 3 + max_tokens
    seq.status = Status.RUNNING
    seq.num_computed = seq.num_known - 1
    return seq


def test_only_decoding_sequences_that_speculate_and_have_room_are_drafted_for():
    recorder = Recorder()
    speculator = Speculator(SpeculativeConfig(method="ngram", num_tokens=4), recorder)
    prefilling = _decoding("prefill")
    prefilling.num_computed = 1
    waiting = _decoding("waiting")
    waiting.status = Status.WAITING
    seqs = [_decoding("a"), _decoding("off", speculative=False), prefilling, waiting,
            _decoding("short", max_tokens=5), _decoding("last", max_tokens=4)]
    speculator.after_step(StepRows(), seqs)
    assert recorder.wanted == [("a", 4), ("short", 1)]  # "short": 2 tokens left, so 1 draft + the sample after it
    assert [s.draft_ids for s in seqs] == [[7] * 4, [], [], [], [7], []]


def test_the_draft_length_follows_the_acceptance():
    estimate = Acceptance(accepted=4.0)
    assert estimate.draft_length(4) == 4
    for _ in range(6):
        estimate.update(drafted=4, accepted=0)
    assert estimate.draft_length(4) == 1
    for _ in range(10):
        estimate.update(drafted=4, accepted=4)
    assert estimate.draft_length(4) == 4
    for _ in range(10):
        estimate.update(drafted=4, accepted=1)  # a = 1/2: one draft expected to pass
    assert estimate.draft_length(4) == 1


def test_a_sequence_that_rejects_its_drafts_is_offered_fewer_and_forgotten_at_the_end():
    recorder = Recorder()
    speculator = Speculator(SpeculativeConfig(method="ngram", num_tokens=4), recorder)
    seq = _decoding("a")
    for _ in range(6):
        speculator.record(seq, 4, 0)
    speculator.after_step(StepRows(), [seq])
    assert recorder.wanted == [("a", 1)]
    speculator.forget(seq)
    assert recorder.forgotten == ["a"]
    speculator.after_step(StepRows(), [seq])
    assert recorder.wanted == [("a", 4)]  # a new estimate


class FakeMatcher:
    def validate_tokens(self, tokens):
        return tokens.index(8) if 8 in tokens else len(tokens)


class FakeGrammar:
    matcher = FakeMatcher()


def test_a_constrained_sequences_drafts_stop_where_its_grammar_refuses_one():
    class Proposer(Recorder):
        def propose(self, step, wanted):
            return [[5, 6, 8, 5] for _ in wanted]

    speculator = Speculator(SpeculativeConfig(method="ngram", num_tokens=4), Proposer())
    seq = _decoding("a")
    seq.grammar = FakeGrammar()
    speculator.after_step(StepRows(), [seq])
    assert seq.draft_ids == [5, 6]
