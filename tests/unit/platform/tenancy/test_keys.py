"""API keys: their format, the lookup prefix, the stored hash and what logs may show."""

from __future__ import annotations

import re
import string

import pytest

from herd.platform.tenancy.keys import PREFIX_CHARS, SECRET_CHARS, hash_key, matches, new_key, prefix_of, redact

KEY = re.compile(r"hk_([A-Za-z0-9]{8})_([A-Za-z0-9]{32})")


def test_a_new_key_reads_hk_prefix_secret() -> None:
    made = new_key()
    match = KEY.fullmatch(made.plaintext)
    assert match is not None, made.plaintext
    assert (PREFIX_CHARS, SECRET_CHARS) == (8, 32)
    assert made.prefix == match.group(1)


def test_two_keys_differ_in_prefix_secret_and_hash() -> None:
    made = [new_key() for _ in range(50)]
    assert len({k.plaintext for k in made}) == 50
    assert len({k.prefix for k in made}) == 50
    assert len({k.plaintext.split("_")[2] for k in made}) == 50
    assert len({k.key_hash for k in made}) == 50


def test_the_stored_hash_is_a_sha256_digest_never_the_key() -> None:
    made = new_key()
    secret = made.plaintext.split("_")[2]
    assert re.fullmatch(r"[0-9a-f]{64}", made.key_hash)
    assert made.key_hash == hash_key(made.plaintext)
    assert made.plaintext not in made.key_hash
    assert secret not in made.key_hash
    assert made.prefix not in made.key_hash


def test_matches_only_the_exact_key() -> None:
    made = new_key()
    assert matches(made.plaintext, made.key_hash)
    secret = made.plaintext.split("_")[2]
    other_char = "a" if secret[-1] != "a" else "b"
    near_misses = [
        made.plaintext[:-1] + other_char,  # one secret character off
        made.plaintext[:-1],  # one character short
        made.plaintext + "x",  # one character long
        made.plaintext.upper() if made.plaintext.upper() != made.plaintext else made.plaintext.lower(),
        " " + made.plaintext,
        made.plaintext + "\n",
        f"hk_{made.prefix}_{new_key().plaintext.split('_')[2]}",  # right prefix, another secret
        made.key_hash,  # the hash itself is not a credential
        "",
    ]
    for candidate in near_misses:
        assert not matches(candidate, made.key_hash), candidate
    assert not matches(made.plaintext, new_key().key_hash)


def test_prefix_of_a_well_formed_key() -> None:
    made = new_key()
    assert prefix_of(made.plaintext) == made.prefix
    assert prefix_of("hk_ABCDefgh_" + "x" * 32) == "ABCDefgh"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hk_",
        "hk__",
        "sk_ABCDefgh_" + "x" * 32,  # another service's key
        "HK_ABCDefgh_" + "x" * 32,
        "hk_ABCDefg_" + "x" * 32,  # prefix one short
        "hk_ABCDefghi_" + "x" * 32,  # prefix one long
        "hk_ABCDefgh_" + "x" * 31,  # secret one short
        "hk_ABCDefgh_" + "x" * 33,  # secret one long
        "hk_ABCDefgh_" + "x" * 16 + "_" + "x" * 15,  # an extra separator
        "hk_ABCDefgh" + "x" * 33,  # no separator before the secret
        "Bearer hk_ABCDefgh_" + "x" * 32,
    ],
)
def test_prefix_of_anything_else_is_none(text: str) -> None:
    assert prefix_of(text) is None


def test_redact_shows_the_prefix_and_never_the_secret() -> None:
    made = new_key()
    secret = made.plaintext.split("_")[2]
    shown = redact(made.plaintext)
    assert shown.startswith(f"hk_{made.prefix}_")
    assert made.prefix in shown
    assert secret not in shown
    # Not even a fragment of the secret: nothing after the prefix but a marker that is no key character.
    rest = shown[len(f"hk_{made.prefix}_"):]
    assert not any(ch in string.ascii_letters + string.digits for ch in rest), shown
    assert made.key_hash not in shown


def test_redact_of_something_that_is_no_key_shows_none_of_it() -> None:
    for text in ("hunter2-password", "sk-" + "z" * 40, "hk_short_secret"):
        shown = redact(text)
        assert text not in shown
        assert shown == "<not a herd key>"
