"""herd.engine.stop_strings: the incremental stop-string search a request's growing text goes through."""

from __future__ import annotations

import pytest

from herd.engine.stop_strings import StopStrings


def feed(stops: StopStrings, pieces: list[str]) -> tuple[int, tuple[int, str] | None]:
    """Grow a text piece by piece as the engine does, searching after each; (pieces fed, first hit)."""
    text = ""
    for count, piece in enumerate(pieces, 1):
        text += piece
        if (hit := stops.find(text)) is not None:
            return count, hit
    return len(pieces), None


def test_a_stop_inside_one_piece_is_found_at_its_index() -> None:
    assert feed(StopStrings(["END"]), ["abc", "xyENDz"]) == (2, (5, "END"))


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_a_stop_spanning_two_pieces_still_stops(cut: int) -> None:
    stop = "<stop>"
    text = "hello " + stop + " world"
    where = text.index(stop) + cut
    assert feed(StopStrings([stop]), [text[:where], text[where:]]) == (2, (6, stop))


def test_a_stop_spanning_many_one_character_pieces() -> None:
    text = "so then ###END### after"
    count, hit = feed(StopStrings(["###END###"]), list(text))
    assert hit == (8, "###END###")
    assert count == 8 + len("###END###")  # found the moment its last character arrives


def test_the_earliest_of_several_stops_wins() -> None:
    stops = StopStrings(["zz", "b", "ccc"])
    assert feed(stops, ["aa ccc b zz"]) == (1, (3, "ccc"))


def test_at_one_index_the_shorter_stop_wins() -> None:
    assert feed(StopStrings(["abcd", "ab"]), ["xxabcd"]) == (1, (2, "ab"))


def test_no_stop_no_hit() -> None:
    assert feed(StopStrings(["END"]), ["EN", "d is not here", "E N D"]) == (3, None)
    assert feed(StopStrings(["never"]), ["a", "b", "c"]) == (3, None)


def test_text_already_searched_is_not_searched_again() -> None:
    """Only the new text and a tail of (longest stop - 1) characters are looked at: a stop string planted
    further back in text already searched (which a real, growing text cannot have) is not seen."""
    stops = StopStrings(["STOP", "ab"])
    assert stops.find("x" * 100) is None
    planted = "STOP" + "x" * 96 + "yy"  # same length plus 2, a stop far back where the text was searched
    assert stops.find(planted) is None
    assert stops.find(planted + "STO") is None
    tail = planted + "STO" + "P"
    assert stops.find(tail) == (len(tail) - 4, "STOP")


def test_unchanged_text_is_not_searched() -> None:
    stops = StopStrings(["ab"])
    assert stops.find("xa") is None
    assert stops.find("xa") is None
    assert stops.find("xab") == (1, "ab")


@pytest.mark.parametrize(("stops", "text", "releasable"), [
    (["END"], "hello", 3),  # "lo" could still begin "END"
    (["a", "four"], "hello", 2),
    (["x"], "hello", 5),
    ([], "hello", 5),
])
def test_releasable_holds_back_the_longest_stop_less_one(stops: list[str], text: str, releasable: int) -> None:
    assert StopStrings(stops).releasable(text) == releasable
