"""Verification's pure parts: rows expanded over drafts (positions, histories as if the drafts were output) and
the count of drafts the samples agree with."""

from __future__ import annotations

from herd.engine.sampling_params import SamplingParams
from herd.engine.sequence import Sequence
from herd.engine.speculative.verify import accepted_count, expand


def test_each_draft_row_samples_the_next_position_after_the_drafts_before_it():
    penalised = Sequence(request_id="a", prompt_ids=[1, 2], output_ids=[5, 6],
                         params=SamplingParams(repetition_penalty=1.3))
    plain = Sequence(request_id="b", prompt_ids=[3], output_ids=[], params=SamplingParams())
    rows = expand([penalised, plain], [(7, 8), ()], [4, 7])
    assert rows.logit_rows == [4, 5, 6, 7]
    assert rows.starts == [0, 3]
    assert rows.positions == [2, 3, 4, 0]
    assert [h.output_ids if h else None for h in rows.histories] == [(5, 6), (5, 6, 7), (5, 6, 7, 8), None]
    assert rows.params == [penalised.params] * 3 + [plain.params]


def test_drafts_are_kept_up_to_the_first_sample_that_differs():
    assert accepted_count((4, 5, 6), [4, 5, 6, 9]) == 3
    assert accepted_count((4, 5, 6), [4, 7, 6, 9]) == 1
    assert accepted_count((4, 5, 6), [1, 5, 6, 9]) == 0
    assert accepted_count((), [3]) == 0


def test_a_steps_rows_follow_its_sampling_chunks_and_forks_verify_nothing():
    from herd.engine.scheduler import ScheduledChunk
    from herd.engine.speculative.verify import verify_rows

    params = SamplingParams()
    decoding = Sequence(request_id="d", prompt_ids=[1, 2], output_ids=[3], params=params)
    leader = Sequence(request_id="l", prompt_ids=[4, 5, 6], params=params)
    fork = Sequence(request_id="l#1", prompt_ids=[4, 5, 6], params=params, index=1)
    prefill = Sequence(request_id="p", prompt_ids=[7] * 9, params=params)
    chunks = [ScheduledChunk(decoding, 2, 3, True, (8, 9)), ScheduledChunk(prefill, 0, 4, False),
              ScheduledChunk(leader, 0, 3, True)]
    assert verify_rows(chunks[1:], [leader], None) is None  # nothing drafted: the plain path
    rows = verify_rows(chunks, [decoding, leader, fork], [0, 1, 1])
    assert rows.drafts == [(8, 9), (), ()]
    assert rows.logit_rows == [0, 1, 2, 3, 3]  # the fork samples from its leader's row
    assert rows.starts == [0, 3, 4]
