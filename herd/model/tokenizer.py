"""The text tokenizer: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` from ``tokenizer.json``.

Invariant: ``encode`` never adds tokens the text does not spell out, except ``<|begin_of_text|>`` when
asked with ``add_bos``. Special-token strings written in the text (a rendered chat prompt is full of
them) become their single special ids, so ``encode(render_chat(...))`` is the prompt the model expects;
with ``literal=True`` they are plain text instead, which is how a client's content must be encoded
(``herd.model.chat_prompt.chat_ids``): a user who types ``<|eot|>`` gets the characters, not the token.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tokenizers

from herd.model.special_tokens import BEGIN_OF_TEXT, STOP_TOKENS

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """Encodes text to token ids and back for one checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str = BEGIN_OF_TEXT,
        eos_token: str | None = None,
    ) -> None:
        """Wrap ``backend``.

        Args:
            backend: the loaded ``tokenizers.Tokenizer``.
            bos_token: the begin-of-sequence token string; must be in the vocabulary.
            eos_token: an extra stop token (the checkpoint's ``eos_token``), added to Llama 4's stop tokens.
        """
        self._backend = backend
        self._literal_backend: tokenizers.Tokenizer | None = None  # made on first use (_literal)
        self._bos_id = self._id_or_raise(bos_token, what="bos token")
        stop = {tid for tok in STOP_TOKENS if (tid := backend.token_to_id(tok)) is not None}
        if eos_token is not None:
            stop.add(self._id_or_raise(eos_token, what="eos token"))
        if not stop:
            raise ValueError(f"the vocabulary has none of the stop tokens {STOP_TOKENS} and no eos token was given")
        self._stop_ids = frozenset(stop)
        self._special_ids = frozenset(tid for tid, added in backend.get_added_tokens_decoder().items() if added.special)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (and ``tokenizer_config.json`` beside it, when present).

        Args:
            path: a checkpoint directory holding ``tokenizer.json``, or the ``tokenizer.json`` file itself.

        Raises:
            FileNotFoundError: ``tokenizer.json`` does not exist.
            ValueError: either file cannot be parsed, or names a bos/eos token missing from the vocabulary.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception for bad JSON or schema
            raise ValueError(f"cannot parse tokenizer file {file}: {exc}") from exc
        config = _read_config(file.parent / TOKENIZER_CONFIG_FILE)
        bos = _token_string(config.get("bos_token"), key="bos_token") or BEGIN_OF_TEXT
        eos = _token_string(config.get("eos_token"), key="eos_token")
        return cls(backend, bos_token=bos, eos_token=eos)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0..vocab_size-1)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        """Id of the begin-of-sequence token."""
        return self._bos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: end_of_text, eom and eot where present, plus the configured eos."""
        return self._stop_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special token (what ``decode`` skips by default)."""
        return self._special_ids

    def encode(self, text: str, *, add_bos: bool = False, literal: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids, or with ``literal`` are encoded
        as the plain text they spell (never a special id). ``add_bos`` prepends bos."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}: {text!r:.80}")
        backend = self._literal() if literal else self._backend
        ids = backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is False.

        Raises:
            ValueError: an id is not an integer in [0, vocab_size).
        """
        checked = [self._check_id(i) for i in ids]
        return self._backend.decode(checked, skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The backend's ``tokenizer.json`` text (for libraries that build their own view of the vocabulary)."""
        return str(self._backend.to_str())

    def token_to_id(self, token: str) -> int:
        """Id of the token string ``token``; ``ValueError`` naming it when it is not in the vocabulary."""
        return self._id_or_raise(token, what="token")

    def __getstate__(self) -> dict[str, Any]:
        # A pickled tokenizers.Tokenizer forgets encode_special_tokens: the copy is made again after unpickling.
        return {**self.__dict__, "_literal_backend": None}

    def _literal(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special-token strings as text. The flag is the backend's own state,
        so it is a copy rather than the flag toggled per call, which would race between threads encoding at
        once; made on first use, since only a front door encodes clients' text. Two threads that race here
        each make one, and either is right."""
        literal = self._literal_backend
        if literal is None:
            literal = tokenizers.Tokenizer.from_str(self._backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        return literal

    def _id_or_raise(self, token: str, *, what: str) -> int:
        tid = self._backend.token_to_id(token)
        if tid is None:
            raise ValueError(f"{what} {token!r} is not in the vocabulary")
        return tid

    def _check_id(self, token_id: Any) -> int:
        try:
            value = operator.index(token_id)
        except TypeError:
            raise ValueError(f"token id {token_id!r} is not an integer") from None
        if isinstance(token_id, bool) or not 0 <= value < self._vocab_size:
            raise ValueError(f"token id {token_id!r} is out of range [0, {self._vocab_size})")
        return value


def _read_config(file: Path) -> Mapping[str, Any]:
    """Parsed ``tokenizer_config.json``, or an empty mapping when the file is absent."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse tokenizer config {file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer config {file} must hold a JSON object, got {type(config).__name__}")
    return config


def _token_string(value: Any, *, key: str) -> str | None:
    """A token string from a config entry, which is a string, ``{"content": ...}``, or null."""
    if value is None or isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, dict) else None
    if isinstance(content, str):
        return content
    raise ValueError(f"tokenizer config {key} must be a string or {{'content': str}}, got {value!r}")
