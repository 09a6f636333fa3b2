"""Prompt lookup's index: the longest suffix found wins, the suffix never finds itself, and a continuation that
runs into the sequence's end goes on copying what it has just proposed (a repeating output drafts k tokens)."""

from __future__ import annotations

from herd.engine.speculative.ngram import NgramIndex


def _index(tokens: list[int], min_n: int = 2, max_n: int = 4) -> NgramIndex:
    index = NgramIndex(min_n, max_n)
    index.catch_up(tokens, [])
    return index


def test_what_followed_the_suffixs_latest_earlier_occurrence_is_proposed():
    index = _index([5, 6, 7, 8, 9, 1, 5, 6])
    assert index.lookup(3) == [7, 8, 9]
    assert index.lookup(1) == [7]


def test_the_longest_suffix_found_wins():
    # [6, 7] last occurred before 2; [5, 6, 7] only before 8.
    index = _index([5, 6, 7, 8, 4, 6, 7, 2, 3, 5, 6, 7])
    assert index.lookup(2) == [8, 4]


def test_no_occurrence_but_the_suffix_itself_proposes_nothing():
    assert _index([1, 2, 3, 4]).lookup(4) == []
    assert _index([1, 1]).lookup(4) == [], "[1, 1] is the suffix itself, found nowhere else"


def test_an_output_repeating_one_token_drafts_k_of_it():
    index = NgramIndex(2, 4)
    index.catch_up([3, 4], [77, 77, 77])
    assert index.lookup(4) == [77, 77, 77, 77]


def test_an_output_repeating_a_short_cycle_drafts_the_cycle_on():
    index = NgramIndex(2, 4)
    index.catch_up([9], [1, 2, 3, 1, 2, 3, 1, 2])
    assert index.lookup(5) == [3, 1, 2, 3, 1]


def test_output_added_later_is_taken_in():
    index = NgramIndex(2, 3)
    index.catch_up([1, 2, 3, 4], [])
    assert index.lookup(2) == []
    index.catch_up([1, 2, 3, 4], [1, 2])
    assert index.lookup(2) == [3, 4]
