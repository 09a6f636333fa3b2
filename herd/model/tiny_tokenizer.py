"""A tiny Llama-4-shaped tokenizer, trained offline on the corpus shipped with the package.

Invariant: the BPE tokens take ids 0..N-1 and Llama 4's 93 named special tokens follow at N..N+92 in
the official order, so every special token sits at the same offset after the BPE vocabulary as in the
real model (``<|begin_of_text|>`` at N, ``<|eot|>`` at N+8, ``<|patch|>`` at N+92). The setup copies
Llama 4's: an o200k-style regex split, byte-level BPE without a prefix space, a byte-level decoder, and
a post-processor that puts ``<|begin_of_text|>`` first when a caller asks for special tokens. Training is
deterministic, so the same call writes the same bytes.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from herd.model.chat_template import JINJA_CHAT_TEMPLATE
from herd.model.special_tokens import BEGIN_OF_TEXT, EOT, FINETUNE_RIGHT_PAD, SPECIAL_TOKENS
from herd.model.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer

# tiktoken's o200k_base split pattern, which Llama 4 uses.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

BYTE_ALPHABET_SIZE = 256
"""Byte-level BPE always holds one token per byte, so ``bpe_vocab_size`` cannot be smaller."""

CORPUS_FILE = "tiny_corpus.txt"


def tiny_corpus() -> str:
    """The English prose, code and multilingual text the tiny tokenizer is trained on."""
    return importlib.resources.files("herd.model").joinpath(CORPUS_FILE).read_text(encoding="utf-8")


def train_tiny_tokenizer(out_dir: Path, *, bpe_vocab_size: int = 419, model_max_length: int = 4096) -> Tokenizer:
    """Train the tiny tokenizer and write ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``.

    Args:
        out_dir: directory to write into; created when missing, files in it overwritten.
        bpe_vocab_size: number of BPE tokens (bytes plus merges); the default gives 512 ids in all.
        model_max_length: the context length written to ``tokenizer_config.json``, in tokens.

    Returns:
        The written tokenizer, loaded back; its ``vocab_size`` is ``bpe_vocab_size + 93``.

    Raises:
        ValueError: ``bpe_vocab_size`` is below 256 or more than the corpus can yield merges for, or
            ``model_max_length`` is not positive.
    """
    if isinstance(bpe_vocab_size, bool) or not isinstance(bpe_vocab_size, int):
        raise ValueError(f"bpe_vocab_size must be an int, got {bpe_vocab_size!r}")
    if bpe_vocab_size < BYTE_ALPHABET_SIZE:
        raise ValueError(f"bpe_vocab_size {bpe_vocab_size} is below the {BYTE_ALPHABET_SIZE} byte tokens")
    if model_max_length <= 0:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")

    backend = _train_bpe(bpe_vocab_size=bpe_vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TOKENIZER_FILE).write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    config = _tokenizer_config(model_max_length=model_max_length)
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Tokenizer.from_pretrained(out_dir)


def _train_bpe(*, bpe_vocab_size: int) -> BackendTokenizer:
    """Byte-level BPE with exactly ``bpe_vocab_size`` tokens, then the 93 specials after them."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([tiny_corpus()], trainer=trainer)
    got = backend.get_vocab_size(with_added_tokens=False)
    if got != bpe_vocab_size:
        raise ValueError(f"bpe_vocab_size {bpe_vocab_size} is more than the corpus yields ({got} tokens)")

    # Added after training so that they take the ids right after the BPE vocabulary, in order.
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    bos_id = backend.token_to_id(BEGIN_OF_TEXT)
    if bos_id != bpe_vocab_size:
        raise RuntimeError(f"special tokens landed at {bos_id}, not right after the BPE vocabulary")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A",
        pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT}:1 $B:1",
        special_tokens=[(BEGIN_OF_TEXT, bos_id)],
    )
    return backend


def _tokenizer_config(*, model_max_length: int) -> dict[str, object]:
    """What transformers' ``PreTrainedTokenizerFast.from_pretrained`` needs beside ``tokenizer.json``."""
    return {
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": EOT,
        "pad_token": FINETUNE_RIGHT_PAD,
        "chat_template": JINJA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
