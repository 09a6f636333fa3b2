"""herd.model.tiny_tokenizer: layout, determinism, and parity with transformers loading the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from herd.model import special_tokens as st
from herd.model.chat_template import render_chat
from herd.model.tiny_tokenizer import O200K_PATTERN, tiny_corpus, train_tiny_tokenizer
from herd.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer trained with default settings, written to a fresh directory."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def ours(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def hf(tiny_dir: Path) -> PreTrainedTokenizerFast:
    """transformers' view of the same files; a local directory, so nothing is fetched."""
    return PreTrainedTokenizerFast.from_pretrained(str(tiny_dir), local_files_only=True)


def test_default_vocab_is_512_with_specials_last(ours: Tokenizer) -> None:
    assert ours.vocab_size == 512
    assert ours.bos_id == ours.token_to_id(st.BEGIN_OF_TEXT) == 419
    assert ours.token_to_id(st.EOT) == 427
    assert ours.token_to_id(st.PATCH) == 511
    assert [ours.token_to_id(t) for t in st.SPECIAL_TOKENS] == list(range(419, 512))


def test_returned_tokenizer_matches_files(tmp_path: Path) -> None:
    returned = train_tiny_tokenizer(tmp_path, bpe_vocab_size=300)
    assert returned.vocab_size == 393
    assert returned.bos_id == 300
    assert returned.token_to_id(st.PATCH) == 392
    assert Tokenizer.from_pretrained(tmp_path).encode("goats") == returned.encode("goats")


def test_training_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    train_tiny_tokenizer(first)
    train_tiny_tokenizer(second)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_setup_is_llama4_like(tiny_dir: Path) -> None:
    spec = json.loads((tiny_dir / "tokenizer.json").read_text())
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": O200K_PATTERN}
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["normalizer"] is None


def test_bpe_was_trained_on_the_corpus(ours: Tokenizer) -> None:
    corpus = tiny_corpus()
    assert 2_000 < len(corpus.encode("utf-8")) < 20_000
    ids = ours.encode(corpus)
    assert len(ids) < 0.7 * len(corpus.encode("utf-8"))  # 163 merges: ~0.58 tokens per byte
    assert ours.decode(ids) == corpus


@pytest.mark.parametrize("bad", [0, 255, 100_000, True, 300.0])
def test_bad_bpe_vocab_size_is_named(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        train_tiny_tokenizer(tmp_path, bpe_vocab_size=bad)


def test_config_fields(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == st.BEGIN_OF_TEXT
    assert config["eos_token"] == st.EOT
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 4096
    assert isinstance(config["chat_template"], str)


# --- parity with transformers ---------------------------------------------------------------------

PARITY_TEXTS = [
    "Hello, world!",
    "  spaces\tand\r\nnewlines\n\n\n",
    "naïve café 東京 🙂 👩‍👩‍👧 Ελληνικά",
    f"{st.BEGIN_OF_TEXT}{st.HEADER_START}user{st.HEADER_END}\n\nhi{st.EOT}{st.IMAGE}{st.PATCH}",
    "numbers 1234567 and code: def f(x): return x**2",
]


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_transformers_encodes_the_same_ids(ours: Tokenizer, hf: PreTrainedTokenizerFast, text: str) -> None:
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.encode(text) == ours.encode(text, add_bos=True)  # tokenizer.json's post-processor adds bos
    ids = ours.encode(text)
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert hf.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)


def test_transformers_sees_the_same_special_tokens(ours: Tokenizer, hf: PreTrainedTokenizerFast) -> None:
    assert len(hf) == ours.vocab_size
    assert hf.bos_token_id == ours.bos_id
    assert hf.eos_token_id == ours.token_to_id(st.EOT)
    assert set(hf.all_special_ids) <= ours.special_ids


CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "\n  Be brief. \n"}, {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": "And sunsets?"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": " one part "}]}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "weather?"}, {"role": "tool", "content": 'ünïcode "quoted" <tag> & more'},
     {"role": "ipython", "content": "2"}],
]  # fmt: skip


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_config_chat_template_renders_like_render_chat(
    hf: PreTrainedTokenizerFast, ours: Tokenizer, index: int, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[index]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == render_chat(messages, add_generation_prompt=add_generation_prompt)
    ids = ours.encode(text)
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
        [{"role": "user", "content": [{"type": "video"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    ],
)
def test_config_chat_template_rejects_what_render_chat_rejects(
    hf: PreTrainedTokenizerFast, messages: list[dict[str, Any]]
) -> None:
    with pytest.raises(ValueError):
        render_chat(messages)
    with pytest.raises(jinja2.exceptions.TemplateError):
        hf.apply_chat_template(messages, tokenize=False)
