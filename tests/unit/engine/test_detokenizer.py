"""herd.engine.detokenizer against the tiny trained byte-level BPE tokenizer.

The tiny vocabulary has no merges for most non-Latin characters, so they arrive one byte per token and
every multi-byte character is split across tokens: the case the detokenizer exists for.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from herd.engine.detokenizer import IncrementalDetokenizer
from herd.model.special_tokens import BEGIN_OF_TEXT, EOT
from herd.model.tiny_tokenizer import train_tiny_tokenizer
from herd.model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
TEXTS = [
    "héllo wörld — 日本語 🦙 ok",
    "🦙🦙🦙🦙🦙🦙🦙",
    "日本語日本語日本語 and then some plain ascii at the end",
    "plain ascii only, nothing special here.",
    "ö\nö\n\nñ — “quoted” ½ € 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_tokenizer(Path(tmp_path_factory.mktemp("tiny_tokenizer")))


def stream(tok: Tokenizer, ids: list[int], *, skip_special_tokens: bool = True) -> tuple[list[str], str]:
    """Push ids one at a time, as the engine does; the pieces released and what flush gives at the end."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(ids[: n + 1]) for n in range(len(ids))]
    rest = detok.flush(ids)
    assert detok.text == "".join(pieces) + rest
    return pieces, rest


def test_texts_split_characters_across_tokens(tok: Tokenizer) -> None:
    """Guards the premise of the tests below: single tokens decode to broken characters."""
    ids = tok.encode(TEXTS[0])
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_and_flush_concatenate_to_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == text
    assert rest == ""  # the text ends on a whole character, so nothing is left for flush


@pytest.mark.parametrize("text", TEXTS)
def test_no_piece_is_a_broken_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces, _ = stream(tok, ids)
    for piece in pieces:
        assert REPLACEMENT not in piece
        assert piece.encode("utf-8").decode("utf-8") == piece


@pytest.mark.parametrize("text", TEXTS)
def test_text_is_released_as_soon_as_complete(tok: Tokenizer, text: str) -> None:
    """After each push the released text is the decoded prefix without its trailing incomplete character."""
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    for n in range(1, len(ids) + 1):
        detok.push(ids[:n])
        assert detok.text == tok.decode(ids[:n]).rstrip(REPLACEMENT)


def test_four_byte_character_comes_out_whole(tok: Tokenizer) -> None:
    ids = tok.encode("🦙")
    assert len(ids) == 4  # one token per byte in the tiny vocabulary
    pieces, rest = stream(tok, ids)
    assert pieces == ["", "", "", "🦙"]
    assert rest == ""


def test_special_tokens_are_skipped(tok: Tokenizer) -> None:
    eot, bos = tok.token_to_id(EOT), tok.token_to_id(BEGIN_OF_TEXT)
    ids = [bos, *tok.encode("héllo"), eot, *tok.encode(" 🦙 wörld"), eot, eot]
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "héllo 🦙 wörld"
    assert all("<|" not in piece for piece in pieces)


def test_special_token_inside_a_split_character_is_skipped(tok: Tokenizer) -> None:
    eot = tok.token_to_id(EOT)
    llama = tok.encode("🦙")
    ids = [*tok.encode("a"), *llama[:2], eot, *llama[2:], *tok.encode("b")]
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "a🦙b"
    assert all(REPLACEMENT not in piece for piece in pieces)


def test_special_tokens_kept_when_not_skipped(tok: Tokenizer) -> None:
    eot = tok.token_to_id(EOT)
    ids = [*tok.encode("a é"), eot, *tok.encode("b")]
    pieces, rest = stream(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) + rest == f"a é{EOT}b"


def test_flush_releases_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🦙")[:-1]  # the llama's last byte is missing
    full = tok.decode(ids)
    assert full.endswith(REPLACEMENT)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(ids[: n + 1]) for n in range(len(ids))]
    assert "".join(pieces) == "ok "
    rest = detok.flush(ids)
    assert rest == full[len("ok ") :]
    assert rest.startswith(REPLACEMENT)
    assert detok.text == full
    assert detok.flush(ids) == ""  # a second flush has nothing more to give


def test_flush_without_push_gives_everything(tok: Tokenizer) -> None:
    ids = tok.encode("日本 ok")
    assert IncrementalDetokenizer(tok).flush(ids) == "日本 ok"


def test_push_without_new_tokens_gives_nothing(tok: Tokenizer) -> None:
    ids = tok.encode("hello wörld")
    detok = IncrementalDetokenizer(tok)
    first = detok.push(ids)
    assert first == "hello wörld"
    assert detok.push(ids) == ""


def test_arbitrary_token_streams_concatenate_to_full_decode(tok: Tokenizer) -> None:
    """Random ids (invalid UTF-8, stray specials, long runs): the stream must still add up exactly."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 24))]
        for skip in (True, False):
            pieces, rest = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip), ids
