"""ContextParallelKV's placement is checked before anything is sent: a rank outside the group, or a holder list
that does not match the forward's tokens, is refused by value (the peers are never reached: the group is a stub)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from herd.model.config import TextConfig
from herd.workers.context_parallel import ContextParallelKV, Purpose, tag


def _config():
    return TextConfig.from_hf(dict(
        vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
        attention_chunk_size=16, no_rope_layer_interval=4, rope_theta=500000.0,
    ))


def _context(rank=0, world=2):
    group = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"))
    return ContextParallelKV(group, _config(), dtype=torch.float32)


def test_holders_outside_the_group_are_refused():
    kv = _context()
    with pytest.raises(ValueError, match=r"outside the group.s ranks 0\.\.1"):
        kv.place(2)
    with pytest.raises(ValueError, match=r"\[0, -1\]"):
        kv.place(torch.tensor([0, -1]))


def test_a_holder_list_must_match_the_forward():
    kv = _context()
    kv.place(torch.tensor([1, 1, 0]))
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="3 holders for a forward of 2 tokens"):
        kv.attend(3, q, k, k, torch.arange(2), None)


def test_only_nope_layers_exchange_and_tags_never_collide():
    kv = _context(rank=1, world=3)
    assert kv.global_layers == (3,) and kv.peers == [0, 2] and set(kv.held) == {0, 2}
    tags = {tag(layer, purpose) for layer in range(48) for purpose in Purpose}
    assert len(tags) == 48 * len(Purpose)
