"""herd.engine.prefix_hash: the salted hash chain over full blocks."""

from __future__ import annotations

import pytest

from herd.engine.prefix_hash import block_hashes

BLOCK = 4
TOKENS = list(range(100, 124))  # six full blocks of four


def test_one_key_per_full_block() -> None:
    keys = block_hashes(TOKENS, BLOCK, "tenant-a")
    assert len(keys) == 6
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    assert len(set(keys)) == 6


def test_same_tokens_and_salt_give_same_keys() -> None:
    assert block_hashes(TOKENS, BLOCK, "tenant-a") == block_hashes(list(TOKENS), BLOCK, "tenant-a")
    assert block_hashes(TOKENS, BLOCK, "tenant-a") == block_hashes(tuple(TOKENS), BLOCK, "tenant-a")


@pytest.mark.parametrize("other_salt", ["tenant-b", "", "tenant-a ", "tenant-A"])
def test_different_salt_changes_every_key(other_salt: str) -> None:
    keys = block_hashes(TOKENS, BLOCK, "tenant-a")
    others = block_hashes(TOKENS, BLOCK, other_salt)
    assert len(others) == len(keys)
    assert not set(keys) & set(others)


def test_change_in_block_zero_changes_every_key() -> None:
    changed = [TOKENS[0] + 1, *TOKENS[1:]]
    keys = block_hashes(TOKENS, BLOCK, "s")
    others = block_hashes(changed, BLOCK, "s")
    assert all(k != o for k, o in zip(keys, others, strict=True))


def test_change_in_later_block_keeps_earlier_keys() -> None:
    changed = list(TOKENS)
    changed[2 * BLOCK + 3] = 0  # last token of block 2
    keys = block_hashes(TOKENS, BLOCK, "s")
    others = block_hashes(changed, BLOCK, "s")
    assert keys[:2] == others[:2]
    assert all(k != o for k, o in zip(keys[2:], others[2:], strict=True))


def test_key_depends_on_position_not_only_on_block_contents() -> None:
    keys = block_hashes([7, 8, 7, 8, 7, 8], 2, "s")
    assert len(set(keys)) == 3


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_only_full_blocks_are_hashed(extra: int) -> None:
    full = TOKENS[: 2 * BLOCK]
    assert block_hashes(full + TOKENS[2 * BLOCK : 2 * BLOCK + extra], BLOCK, "s") == block_hashes(full, BLOCK, "s")


def test_shorter_than_one_block_gives_no_keys() -> None:
    assert block_hashes(TOKENS[: BLOCK - 1], BLOCK, "s") == []
    assert block_hashes([], BLOCK, "s") == []


def test_completing_a_block_appends_one_key() -> None:
    partial = block_hashes(TOKENS[:11], BLOCK, "s")
    full = block_hashes(TOKENS[:12], BLOCK, "s")
    assert full[:-1] == partial
    assert len(full) == 3


@pytest.mark.parametrize("start", [1, 2, 3, 5])
def test_continuing_from_parent_equals_hashing_all_at_once(start: int) -> None:
    keys = block_hashes(TOKENS, BLOCK, "s")
    tail = block_hashes(TOKENS, BLOCK, "s", start=start, parent=keys[start - 1])
    assert keys[:start] + tail == keys


def test_incremental_hashing_as_a_sequence_grows() -> None:
    keys: list[bytes] = []
    for n in range(1, len(TOKENS) + 1):
        keys += block_hashes(TOKENS[:n], BLOCK, "s", start=len(keys), parent=keys[-1] if keys else None)
    assert keys == block_hashes(TOKENS, BLOCK, "s")


def test_start_past_the_end_gives_no_keys() -> None:
    keys = block_hashes(TOKENS, BLOCK, "s")
    assert block_hashes(TOKENS, BLOCK, "s", start=6, parent=keys[-1]) == []


def test_block_size_is_part_of_the_key() -> None:
    assert block_hashes(TOKENS[:8], 8, "s")[0] != block_hashes(TOKENS[:8], 4, "s")[1]


def test_large_token_ids_hash() -> None:
    keys = block_hashes([202047, 200000, 0, 2**40], BLOCK, "s")
    assert len(keys) == 1
