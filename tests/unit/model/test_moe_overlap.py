"""MoE with an experts executor: the routed rows are submitted, the shared expert runs while they are out,
and only then does the layer wait for them (issue 21). The logits are the same as without an executor.

Legend: T tokens, R rows, H hidden, E experts."""

from __future__ import annotations

import pytest
import torch

from herd.model import load_model
from herd.model.moe import MoE
from herd.model.tiny import make_tiny

IDS = torch.arange(3, 20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), preset="scout", seed=5)


class RecordingExecutor:
    """Runs the model's own experts, but only when waited for, and records the order of what happened."""

    expert_order: tuple[int, ...] | None = None

    def __init__(self, model, events: list[tuple[str, int]]) -> None:
        self.layers = {m.layer: m.experts for m in model.modules() if isinstance(m, MoE)}
        self.events = events

    def submit(self, layer, rows, expert_offsets):
        self.events.append(("submit", layer))
        sent = rows.clone()  # what a transport would have sent: the layer must not change the rows meanwhile

        def wait():
            self.events.append(("wait", layer))
            assert torch.equal(rows, sent), "the rows changed while they were out"
            return self.layers[layer](rows, expert_offsets)  # [R, H]

        return wait

    def __call__(self, layer, rows, expert_offsets):
        return self.submit(layer, rows, expert_offsets)()


def _record_shared_expert(model, events):
    for module in model.modules():
        if isinstance(module, MoE):
            module.shared_expert.register_forward_pre_hook(
                lambda _m, _args, layer=module.layer: events.append(("shared", layer)))


def test_the_shared_expert_runs_after_the_submit_and_before_the_wait(tiny):
    model = load_model(tiny, progress=False)
    events: list[tuple[str, int]] = []
    _record_shared_expert(model, events)
    model.set_experts_executor(RecordingExecutor(model, events))
    model.logits(IDS)

    moe_layers = [m.layer for m in model.modules() if isinstance(m, MoE)]
    assert len(moe_layers) > 1
    expected = [(event, layer) for layer in moe_layers for event in ("submit", "shared", "wait")]
    assert events == expected


def test_the_logits_are_exactly_those_without_an_executor(tiny):
    model = load_model(tiny, progress=False)
    assert model.lm_head.weight.dtype == torch.float32
    alone = model.logits(IDS)
    model.set_experts_executor(RecordingExecutor(model, []))
    overlapped = model.logits(IDS)
    torch.testing.assert_close(overlapped, alone, rtol=0, atol=0)


def test_a_plain_function_executor_is_still_called_once_per_layer(tiny):
    # Executors without submit (plain functions, as some tests and tools pass) run at once, then the shared expert.
    model = load_model(tiny, progress=False)
    alone = model.logits(IDS)
    events: list[tuple[str, int]] = []
    _record_shared_expert(model, events)
    experts = {m.layer: m.experts for m in model.modules() if isinstance(m, MoE)}

    def run(layer, rows, expert_offsets):
        events.append(("run", layer))
        return experts[layer](rows, expert_offsets)

    model.set_experts_executor(run)
    torch.testing.assert_close(model.logits(IDS), alone, rtol=0, atol=0)
    assert events == [(event, m) for m in sorted(experts) for event in ("run", "shared")]
