"""A forward of micro-batches (issue 28's ping-pong): each micro-batch's logits equal its own forward, and the
layers interleave so that one micro-batch's routed rows are out while the other's attention runs.

Legend: T tokens, R rows, V vocab."""

from __future__ import annotations

import pytest
import torch

from herd.model import load_model
from herd.model.micro_batch import MicroBatch
from herd.model.moe import MoE
from herd.model.tiny import make_tiny
from tests.unit.model.test_moe_overlap import RecordingExecutor


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(tmp_path_factory, request):
    return make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=7)


def _ids(seed: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_each_micro_batch_gives_its_own_forwards_logits_also_with_a_cache(tiny, seed):
    model = load_model(tiny, progress=False)
    vocab = model.config.vocab_size
    prompts = [_ids(seed, 29, vocab), _ids(seed + 10, 6, vocab), _ids(seed + 20, 13, vocab)]
    alone_caches = [model.new_cache() for _ in prompts]
    caches = [model.new_cache() for _ in prompts]
    for step in range(3):  # a prefill, then two decodes, each sequence with its own cache
        ids = prompts if step == 0 else [torch.tensor([int(i[-1]) + step]) for i in prompts]
        alone = [model(i, cache=c) for i, c in zip(ids, alone_caches, strict=True)]
        batches = [MicroBatch(i, torch.arange(len(c), len(c) + i.shape[0]), c) for i, c in zip(ids, caches,
                                                                                               strict=True)]
        together = model.forward_micro_batches(batches)
        for mine, reference in zip(together, alone, strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=0)  # same ops on the same shapes: bitwise


def test_logit_rows_pick_rows_of_each_micro_batch(tiny):
    model = load_model(tiny, progress=False)
    ids = _ids(3, 17, model.config.vocab_size)
    rows = torch.tensor([16, 4])
    whole = model(ids, logit_rows=rows)
    picked = model.forward_micro_batches([MicroBatch(ids, torch.arange(17), logit_rows=rows),
                                          MicroBatch(ids[:5], torch.arange(5))])
    torch.testing.assert_close(picked[0], whole, rtol=0, atol=0)
    torch.testing.assert_close(picked[1], model(ids[:5]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        model.forward_micro_batches([])


def test_one_micro_batchs_rows_are_out_while_the_others_attention_runs(tiny):
    """begin A0, begin B0, finish A0, begin A1, finish B0, ...: B's layer-L rows are submitted before A's are
    waited for, and A's next layer's attention runs while B's layer-L rows are out (Maverick's dense layers between
    MoE layers included)."""
    model = load_model(tiny, progress=False)
    events: list[tuple] = []
    model.set_experts_executor(RecordingExecutor(model, events))
    ids_a, ids_b = _ids(5, 11, model.config.vocab_size), _ids(6, 4, model.config.vocab_size)
    plain = [model(ids_a), model(ids_b)]

    def attention_hook(module, args):  # which micro-batch attends, by its token count
        events.append(("attend", "A" if args[0].shape[0] == 11 else "B", module.layer))

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(attention_hook)
    events.clear()
    out = model.forward_micro_batches([MicroBatch(ids_a, torch.arange(11)), MicroBatch(ids_b, torch.arange(4))])
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)
    for layer in [m.layer for m in model.modules() if isinstance(m, MoE)][:-1]:
        submits = [i for i, e in enumerate(events) if e == ("submit", layer)]  # A's, then B's
        waits = [i for i, e in enumerate(events) if e == ("wait", layer)]
        assert len(submits) == 2 and len(waits) == 2
        assert submits[1] < waits[0], f"layer {layer}: B's rows were not out before A waited for its own"
        a_next = events.index(("attend", "A", layer + 1))
        assert submits[1] < a_next < waits[1], f"layer {layer}: A's next attention did not run while B's rows were out"
