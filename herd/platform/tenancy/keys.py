"""API keys: shown once, stored as a SHA-256 hash beside a short public prefix used for lookup.

A key reads `hk_<prefix>_<secret>`: 8 random prefix characters and 32 secret ones (about 190 bits).
Keys are high-entropy random strings, so a plain SHA-256 (no slow KDF) is the standard protection,
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

_ALPHABET = string.ascii_letters + string.digits
PREFIX_CHARS = 8
SECRET_CHARS = 32


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: `plaintext` exists only here, to be shown once."""

    plaintext: str
    prefix: str
    key_hash: str


def new_key() -> NewKey:
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_CHARS))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_CHARS))
    plaintext = f"hk_{prefix}_{secret}"
    return NewKey(plaintext=plaintext, prefix=prefix, key_hash=hash_key(plaintext))


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def prefix_of(plaintext: str) -> str | None:
    """The lookup prefix of something that looks like a key, else None."""
    parts = plaintext.split("_")
    if len(parts) != 3 or parts[0] != "hk" or len(parts[1]) != PREFIX_CHARS or len(parts[2]) != SECRET_CHARS:
        return None
    return parts[1]


def matches(plaintext: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(plaintext), key_hash)


def redact(plaintext: str) -> str:
    """What logs may show of a key: its public prefix only."""
    prefix = prefix_of(plaintext)
    return f"hk_{prefix}_…" if prefix else "<not a herd key>"
