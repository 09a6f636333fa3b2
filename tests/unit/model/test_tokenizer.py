"""herd.model.tokenizer and herd.model.special_tokens, against the tiny trained tokenizer."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from herd.model import special_tokens as st
from herd.model.tiny_tokenizer import train_tiny_tokenizer
from herd.model.tokenizer import Tokenizer

BPE_VOCAB_SIZE = 419


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny tokenizer's tokenizer.json and tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(out, bpe_vocab_size=BPE_VOCAB_SIZE)
    return out


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


# --- special token layout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "real_id"),
    [
        (st.BEGIN_OF_TEXT, 200000),
        (st.END_OF_TEXT, 200001),
        (st.HEADER_START, 200005),
        (st.HEADER_END, 200006),
        (st.EOM, 200007),
        (st.EOT, 200008),
        (st.PYTHON_START, 200016),
        (st.PYTHON_END, 200017),
        (st.FINETUNE_RIGHT_PAD, 200018),
        ("<|text_post_train_reserved_special_token_6|>", 200019),
        ("<|text_post_train_reserved_special_token_66|>", 200079),
        (st.IMAGE_START, 200080),
        (st.IMAGE_END, 200081),
        (st.TILE_X_SEPARATOR, 200084),
        (st.TILE_Y_SEPARATOR, 200085),
        (st.IMAGE, 200090),
        (st.PATCH, 200092),
    ],
)
def test_special_token_ids_in_the_real_model(token: str, real_id: int) -> None:
    assert st.LLAMA4_BPE_VOCAB_SIZE + st.special_token_offset(token) == real_id


def test_special_token_list_is_93_distinct_tokens() -> None:
    assert len(st.SPECIAL_TOKENS) == 93
    assert len(set(st.SPECIAL_TOKENS)) == 93
    assert st.SPECIAL_TOKENS[-1] == st.PATCH
    with pytest.raises(ValueError, match="not_a_token"):
        st.special_token_offset("<|not_a_token|>")


def test_tiny_tokenizer_keeps_the_relative_layout(tok: Tokenizer) -> None:
    for offset, token in enumerate(st.SPECIAL_TOKENS):
        assert tok.token_to_id(token) == BPE_VOCAB_SIZE + offset, token
    assert tok.vocab_size == BPE_VOCAB_SIZE + 93
    assert tok.bos_id == BPE_VOCAB_SIZE
    assert tok.stop_ids == {BPE_VOCAB_SIZE + 1, BPE_VOCAB_SIZE + 7, BPE_VOCAB_SIZE + 8}
    assert tok.special_ids == set(range(BPE_VOCAB_SIZE, BPE_VOCAB_SIZE + 93))


# --- encode / decode ------------------------------------------------------------------------------

FIXED_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\r\nand\u00a0nbsp",
    "naïve café — Zürich, 東京, 한국어, Ελληνικά, русский",
    "emoji 🙂🚀 with ZWJ 👩‍👩‍👧 and flags 🇵🇹",
    "combining e\u0301 and \u0000 nul and \U0010ffff max code point",
    "<|eot almost special|> <| header_start |>",
    "def f(x):\n    return x ** 2  # comment\n",
]


def _random_texts(count: int, *, seed: int) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FF), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]  # fmt: skip
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        texts.append("".join(chars))
    return texts


@pytest.mark.parametrize(
    "text",
    [pytest.param(t, id=f"fixed{i}") for i, t in enumerate(FIXED_TEXTS)]
    + [pytest.param(t, id=f"random{i}") for i, t in enumerate(_random_texts(200, seed=1234))],
)
def test_text_round_trips(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size and i not in tok.special_ids for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_bpe_merges_shorten_english(tok: Tokenizer) -> None:
    text = "The lighthouse keeper wrote the same line in her log every evening."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) // 2


@pytest.mark.parametrize("token", st.SPECIAL_TOKENS)
def test_special_token_strings_in_text_encode_as_one_id(tok: Tokenizer, token: str) -> None:
    tid = tok.token_to_id(token)
    assert tok.encode(token) == [tid]
    ids = tok.encode(f"before{token}after")
    assert ids.count(tid) == 1
    assert ids == [*tok.encode("before"), tid, *tok.encode("after")]


def test_decode_with_and_without_specials(tok: Tokenizer) -> None:
    text = f"{st.BEGIN_OF_TEXT}{st.HEADER_START}user{st.HEADER_END}\n\nhi there{st.EOT}"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert ids[-1] == tok.token_to_id(st.EOT)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\n\nhi there"


def test_add_bos_prepends_exactly_one_bos(tok: Tokenizer) -> None:
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.encode("", add_bos=True) == [tok.bos_id]


def test_encode_rejects_non_text(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="bytes"):
        tok.encode(b"hi")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 512, 10**9, "3", 1.0, True])
def test_decode_rejects_bad_ids_naming_them(tok: Tokenizer, bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"token id {bad!r}")):
        tok.decode([1, bad])  # type: ignore[list-item]


def test_token_to_id_names_the_missing_token(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=re.escape("<|nope|>")):
        tok.token_to_id("<|nope|>")


# --- loading --------------------------------------------------------------------------------------


def test_loads_from_the_json_file_itself(tiny_dir: Path, tok: Tokenizer) -> None:
    again = Tokenizer.from_pretrained(str(tiny_dir / "tokenizer.json"))
    assert again.encode("same ids?") == tok.encode("same ids?")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere.json")


@pytest.mark.parametrize("content", ["{not json", '{"model": 3}', ""])
def test_corrupt_tokenizer_json_is_named(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_works_without_tokenizer_config(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.bos_id == BPE_VOCAB_SIZE
    assert bare.stop_ids == {bare.token_to_id(t) for t in (st.END_OF_TEXT, st.EOM, st.EOT)}


def test_config_tokens_are_read(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": {"content": st.FIM_PREFIX}, "eos_token": st.FINETUNE_RIGHT_PAD}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    custom = Tokenizer.from_pretrained(tmp_path)
    assert custom.bos_id == custom.token_to_id(st.FIM_PREFIX)
    assert custom.token_to_id(st.FINETUNE_RIGHT_PAD) in custom.stop_ids
    assert custom.token_to_id(st.EOT) in custom.stop_ids


@pytest.mark.parametrize(
    ("config_text", "match"),
    [
        ("{broken", "tokenizer_config.json"),
        ("[1, 2]", "JSON object"),
        ('{"bos_token": 7}', "bos_token"),
        ('{"eos_token": "<|not_there|>"}', "not_there"),
    ],
)
def test_bad_config_is_named(tiny_dir: Path, tmp_path: Path, config_text: str, match: str) -> None:
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path)


def test_literal_encoding_spells_special_tokens_as_text(tok: Tokenizer) -> None:
    text = f"a{st.EOT}b{st.HEADER_START}"
    assert tok.token_to_id(st.EOT) in tok.encode(text)
    literal = tok.encode(text, literal=True)
    assert not set(literal) & tok.special_ids
    assert tok.decode(literal) == text
    assert tok.encode("plain words", literal=True) == tok.encode("plain words")
    assert tok.token_to_id(st.EOT) in tok.encode(text)  # the literal copy leaves the normal encoding alone


def test_literal_encoding_survives_pickling(tok: Tokenizer) -> None:
    """A pickled tokenizers.Tokenizer forgets that it reads special-token strings as text (a Ray hop pickles)."""
    import pickle

    text = f"a{st.EOT}"
    tok.encode(text, literal=True)  # the literal copy exists before the hop
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(text, literal=True) == tok.encode(text, literal=True)
    assert copy.encode(text) == tok.encode(text)
