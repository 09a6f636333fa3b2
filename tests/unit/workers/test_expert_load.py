"""Tokens per expert per layer: counts from dispatch (by expert order) and from the trunk's own experts
(kept on the experts' device) add up to what was routed."""

from __future__ import annotations

import torch

from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.workers.expert_load import CountingExperts, ExpertLoad


def test_both_ways_of_counting_add_up_per_layer():
    load = ExpertLoad(4)
    load.add(0, [2, 0, 1, 3], [0, 5, 5, 7, 10])  # expert 2: 5 rows, 0: none, 1: 2, 3: 3
    load.add_offsets(0, torch.tensor([0, 1, 1, 4, 4]))  # expert 0: 1, 1: 0, 2: 3, 3: 0
    load.add_offsets(0, torch.tensor([0, 0, 2, 2, 3]))
    load.add_offsets(3, torch.tensor([0, 4, 4, 4, 4]))
    assert load.snapshot() == {0: [1, 4, 8, 4], 3: [4, 0, 0, 0]}
    assert load.snapshot() == {0: [1, 4, 8, 4], 3: [4, 0, 0, 0]}, "reading does not move the counts"


def test_counting_experts_count_every_routed_row(tmp_path):
    model = load_model(make_tiny(tmp_path, seed=0), progress=False)
    load = ExpertLoad(model.config.num_local_experts)
    model.set_experts_executor(CountingExperts(model, load))
    tokens = 23
    model.logits(torch.arange(tokens))
    counts = load.snapshot()
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.feed_forward, "experts")]
    assert sorted(counts) == moe_layers
    assert all(sum(c) == tokens * model.config.num_experts_per_tok for c in counts.values())
