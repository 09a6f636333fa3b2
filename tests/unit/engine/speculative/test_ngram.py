"""Prompt lookup: the longest suffix that occurred before finds what followed its latest earlier occurrence; the
suffix never finds itself; a continuation that runs into the end copies on what it has just proposed (a repeating
output drafts k tokens); the index grows with the tokens and answers as one built from scratch does."""

from __future__ import annotations

from herd.engine.sampling_params import SamplingParams
from herd.engine.sequence import Sequence
from herd.engine.speculative.ngram import NgramIndex, NgramProposer
from herd.engine.speculative.proposer import StepRows


def _index(tokens, low=2, high=4):
    index = NgramIndex(low, high)
    index.catch_up(tokens, [])
    return index


def test_the_continuation_of_the_latest_earlier_occurrence_is_proposed():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert _index(tokens).lookup(3) == [7, 8, 5]  # the later of the two [1, 2, 3] before the suffix


def test_the_longest_suffix_wins_over_a_more_recent_shorter_one():
    tokens = [4, 1, 2, 3, 50, 51, 7, 2, 3, 60, 4, 1, 2, 3]
    assert _index(tokens).lookup(2) == [50, 51]  # [4, 1, 2, 3] beats the later [2, 3]


def test_a_suffix_never_finds_itself_and_nothing_is_proposed_without_a_match():
    assert _index([5, 6, 7, 8]).lookup(3) == []
    assert _index([5, 6]).lookup(3) == []
    assert _index([5, 6, 7, 5]).lookup(3) == []  # one token: below prompt_lookup_min


def test_a_continuation_that_runs_into_the_end_copies_on():
    assert _index([1, 2, 1, 2]).lookup(5) == [1, 2, 1, 2, 1]


def test_an_output_repeating_one_token_drafts_k_of_it():
    index = NgramIndex(2, 4)
    index.catch_up([3, 4], [77, 77, 77])
    assert index.lookup(4) == [77, 77, 77, 77]


def test_an_output_repeating_a_short_cycle_drafts_the_cycle_on():
    index = NgramIndex(2, 4)
    index.catch_up([9], [1, 2, 3, 1, 2, 3, 1, 2])
    assert index.lookup(5) == [3, 1, 2, 3, 1]


def test_the_index_grows_with_the_output_as_a_fresh_one_answers():
    prompt = [3, 4, 5, 6, 3, 4]
    grown = NgramIndex(2, 3)
    output: list[int] = []
    for token in [5, 9, 3, 4, 5, 6, 3, 4, 5]:
        output.append(token)
        grown.catch_up(prompt, output)
        fresh = NgramIndex(2, 3)
        fresh.catch_up(prompt + output, [])
        assert grown.lookup(4) == fresh.lookup(4)


def test_the_proposer_keeps_one_index_per_sequence_and_forgets_it():
    proposer = NgramProposer(2, 4)
    seq = Sequence(request_id="a", prompt_ids=[1, 2, 3, 4, 1, 2], params=SamplingParams())
    assert proposer.propose(StepRows(), [(seq, 2)]) == [[3, 4]]
    seq.output_ids += [3, 4]
    assert proposer.propose(StepRows(), [(seq, 3)]) == [[1, 2, 3]]
    assert proposer.propose(StepRows(), [(seq, 6)]) == [[1, 2, 3, 4, 1, 2]]
    proposer.forget(seq)
    assert proposer._indices == {}
