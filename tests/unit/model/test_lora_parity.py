"""Herd's Llama 4 with LoRA adapters against transformers + PEFT, and mixed-adapter batches against rows alone.

PEFT expresses the routed experts too (target_parameters on the fused gate_up_proj / down_proj), so every
adapted module, experts included, is compared with PEFT's own forward.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from herd.model import load_model
from herd.model.causal_attention import attend
from herd.model.lora import load_adapter
from herd.model.tiny_lora import make_tiny_lora
from tests.hf_reference import VOCAB, build, per_position_rel_error, save, text_reference

pytestmark = pytest.mark.filterwarnings(
    # PEFT wraps the vision tower's q/k/v/o_proj too (suffix targets); the adapter has no factors there, so those
    # wrappers (and PEFT's default q/v targets of an experts-only adapter) keep B = 0 and add nothing.
    "ignore:Found missing adapter keys while loading the checkpoint:UserWarning")

TOLERANCE = 1e-4
LENGTH = 20
# PEFT's target_modules as one regex: the text decoder's projections, not the vision tower's.
TEXT_MODULES = (r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj"
                r"|feed_forward\.(shared_expert\.)?(gate|up|down)_proj)")
EXPERT_PARAMS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def _ids(seed: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _peft_logits(peft_model: PeftModel, ids: torch.Tensor) -> torch.Tensor:
    """The adapted language model's logits (the multimodal wrapper's forward refuses text-only input)."""
    return text_reference(peft_model.base_model.model)(ids[None]).logits[0].float()


def _slots(slot: int, length: int = LENGTH) -> torch.Tensor:
    return torch.full((length,), slot, dtype=torch.int64)


@pytest.mark.parametrize("variant", ["scout", "maverick"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_herd_adapter_matches_peft(tmp_path, variant, seed):
    """An adapter Herd writes (attention, shared expert / dense MLP, routed experts), loaded by PEFT and by Herd."""
    ref = build(variant, seed, layout="conditional")
    model = load_model(save(ref, tmp_path / "model"), progress=False)
    adapter = make_tiny_lora(tmp_path / "adapter", model.config, rank=4 + 4 * seed, lora_alpha=8.0 * (seed + 1),
                             use_rslora=seed == 2, seed=seed)
    ids = _ids(seed)
    base = text_reference(ref)(ids[None]).logits[0].float().detach()
    want = _peft_logits(PeftModel.from_pretrained(ref, adapter), ids)
    model.new_adapter_bank(slots=2).load(1, load_adapter(adapter, model.config))
    errors = per_position_rel_error(model(ids, adapter_slots=_slots(1)).float(), want)
    assert errors.max() < TOLERANCE, f"{variant} seed {seed}: max rel err {errors.max():.2e}"
    assert per_position_rel_error(base, want).min() > 100 * TOLERANCE, "the adapter must move every position"


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_peft_trained_layout_matches_peft(tmp_path, variant):
    """An adapter PEFT itself creates and saves (random A and B) gives Herd PEFT's logits."""
    ref = build(variant, 3, layout="conditional")
    model = load_model(save(ref, tmp_path / "model"), progress=False)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_MODULES, target_parameters=EXPERT_PARAMS,
                        init_lora_weights=False)
    peft_model = get_peft_model(ref, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = _ids(3)
    want = _peft_logits(peft_model, ids)
    model.new_adapter_bank(slots=1).load(0, load_adapter(tmp_path / "adapter", model.config))
    errors = per_position_rel_error(model(ids, adapter_slots=_slots(0)).float(), want)
    assert errors.max() < TOLERANCE, f"{variant}: max rel err {errors.max():.2e}"


@pytest.mark.parametrize("targets", [("experts",), ("attention",), ("shared_expert", "dense_mlp")])
def test_each_target_group_alone_matches_peft(tmp_path, targets):
    """Each module group is checked on its own, so none of them can hide behind the others."""
    ref = build("maverick", 4, layout="conditional")
    model = load_model(save(ref, tmp_path / "model"), progress=False)
    adapter = make_tiny_lora(tmp_path / "adapter", model.config, rank=8, targets=targets, seed=4)
    ids = _ids(4)
    base = text_reference(ref)(ids[None]).logits[0].float().detach()
    want = _peft_logits(PeftModel.from_pretrained(ref, adapter), ids)
    model.new_adapter_bank(slots=1).load(0, load_adapter(adapter, model.config))
    assert per_position_rel_error(model(ids, adapter_slots=_slots(0)).float(), want).max() < TOLERANCE
    assert per_position_rel_error(base, want).max() > 100 * TOLERANCE


def test_wrong_scaling_fails_parity(tmp_path):
    """Control: the same adapter with its scaling off by 10% is far outside the tolerance."""
    ref = build("scout", 0, layout="conditional")
    model = load_model(save(ref, tmp_path / "model"), progress=False)
    adapter = make_tiny_lora(tmp_path / "adapter", model.config, rank=8, seed=0)
    ids = _ids(0)
    want = _peft_logits(PeftModel.from_pretrained(ref, adapter), ids)
    bank = model.new_adapter_bank(slots=1)
    bank.load(0, load_adapter(adapter, model.config))
    for stack in bank.stacks.values():
        stack.scaling.mul_(1.1)
    assert per_position_rel_error(model(ids, adapter_slots=_slots(0)).float(), want).max() > 100 * TOLERANCE


class PerSequenceKV:
    """A KV context for a batch of whole sequences side by side: each attends only to its own tokens."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def attend(self, layer, q, k, v, positions, chunk_size):
        parts = zip(q.split(self.lengths), k.split(self.lengths), v.split(self.lengths),
                    positions.split(self.lengths), strict=True)
        return torch.cat([attend(qs, ks, vs, ps, ps, chunk_size) for qs, ks, vs, ps in parts])


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_mixed_batch_gives_each_row_its_own_logits(tmp_path, variant):
    """Three adapters (different ranks and targets) and the base model in one batch: each sequence's logits
    equal those it gets alone; the base slot equals the model without LoRA, exactly."""
    ref = build(variant, 5, layout="causal")
    model = load_model(save(ref, tmp_path / "model"), progress=False)
    specs = [dict(rank=4, targets=("attention", "experts")), dict(rank=16, targets=("shared_expert", "dense_mlp")),
             dict(rank=8, targets=("attention", "shared_expert", "dense_mlp", "experts"), use_rslora=True)]
    adapters = [load_adapter(make_tiny_lora(tmp_path / f"a{i}", model.config, seed=10 + i, prefix="model.", **spec),
                             model.config) for i, spec in enumerate(specs)]
    slots = (0, -1, 1, 2, -1)  # two base sequences among them
    seqs = [_ids(20 + i, 5 + 2 * i) for i in range(len(slots))]
    lengths = [s.shape[0] for s in seqs]
    ids, positions = torch.cat(seqs), torch.cat([torch.arange(n) for n in lengths])
    plain_alone = [model(s).float() for s in seqs]  # no bank yet
    plain_mixed = model(ids, positions, PerSequenceKV(lengths)).float()
    bank = model.new_adapter_bank(slots=3)
    for slot, adapter in enumerate(adapters):
        bank.load(slot, adapter)
    token_slots = torch.cat([_slots(s, n) for s, n in zip(slots, lengths, strict=True)])
    mixed = model(ids, positions, PerSequenceKV(lengths), adapter_slots=token_slots).float().split(lengths)
    # Every token on the base slot, with the three adapters resident: exactly the batch without LoRA. (In the
    # mixed batch, base rows match within rounding only: adapted rows route differently, which changes the
    # expert GEMMs' group sizes and so their blocking.)
    all_base = model(ids, positions, PerSequenceKV(lengths), adapter_slots=torch.full_like(ids, -1)).float()
    assert torch.equal(all_base, plain_mixed)
    for i, (slot, seq) in enumerate(zip(slots, seqs, strict=True)):
        alone = model(seq, adapter_slots=_slots(slot, seq.shape[0])).float()
        assert per_position_rel_error(mixed[i], alone).max() < 1e-5, f"sequence {i} (slot {slot})"
        if slot == -1:
            assert torch.equal(alone, plain_alone[i]), "a base sequence alone must equal the model without LoRA"
        else:
            assert per_position_rel_error(alone, plain_alone[i]).min() > 100 * TOLERANCE, "each adapter must matter"


def test_unloaded_slot_adds_nothing(tmp_path):
    """Unloading zeroes a slot: tokens still pointing at it get the base model's logits, exactly."""
    model = load_model(save(build("scout", 6, layout="causal"), tmp_path / "model"), progress=False)
    ids = _ids(6)
    plain = model(ids).float()
    bank = model.new_adapter_bank(slots=2)
    bank.load(1, load_adapter(make_tiny_lora(tmp_path / "a", model.config, prefix="model."), model.config))
    assert not torch.equal(model(ids, adapter_slots=_slots(1)).float(), plain)
    bank.unload(1)
    assert torch.equal(model(ids, adapter_slots=_slots(1)).float(), plain)
