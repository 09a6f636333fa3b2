"""LoRA adapters on the routed experts of expert shards (herd.workers.shard_adapters): a shard's compute with row
slots equals the trunk's in-process experts with the bank's stacks, and a trunk whose experts run at shards (the
in-process transport) gives the logits of the model that holds its experts, for a mixed batch of two adapters and
the base model, and after a slot is emptied and refilled with another adapter (no stale factors at the shards).

Legend: R rows, E experts, H hidden."""

from __future__ import annotations

import pytest
import torch

from herd import kernels
from herd.kernels.lora import ExpertsLoRA
from herd.model import load_model
from herd.model.lora import load_adapter
from herd.model.lora_bank import AdapterBank
from herd.model.lora_sites import EXPERTS
from herd.model.tiny import make_tiny
from herd.model.tiny_lora import make_tiny_lora
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import place_experts
from herd.workers.shard_experts import ShardExperts, expert_offsets
from herd.workers.transport import InProcessTransport

TOLERANCE = 1e-5
HELD = (1, 4, 5, 11)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    out = tmp_path_factory.mktemp("scout")
    path = make_tiny(out / "model", preset="scout", seed=3)
    config = load_model(path, experts=(), progress=False).config
    adapters = [make_tiny_lora(out / f"adapter{i}", config, rank=4 + 2 * i, seed=i, targets=("experts", "attention"))
                for i in range(3)]
    return path, config, adapters


def _rows_by_expert(counts, hidden, seed):
    return torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(seed))  # [R, H]


def test_shard_compute_with_row_slots_equals_the_trunks_experts_with_its_stacks(scout):
    path, config, paths = scout
    layer, experts = config.moe_layers[0], config.num_local_experts
    bank = AdapterBank(config, slots=3, max_rank=8, dtype=torch.float32, device="cpu")
    adapters = {0: load_adapter(paths[0], config), 2: load_adapter(paths[2], config)}
    shard = ShardExperts.load(path, HELD)
    for slot, adapter in adapters.items():
        bank.load(slot, adapter)
        shard.load_adapter(slot, adapter, slots=3, max_rank=8)
    generator = torch.Generator().manual_seed(0)
    counts = [int(c) for c in torch.randint(1, 5, (len(HELD),), generator=generator)]
    rows = _rows_by_expert(counts, config.hidden_size, 1)
    row_slots = torch.tensor([0, 1, 3])[torch.randint(0, 3, (rows.shape[0],), generator=generator)]  # base, 0, 2
    row_experts = torch.repeat_interleave(torch.tensor(HELD), torch.tensor(counts))  # [R]
    full = load_model(path, progress=False).model.layers[layer].feed_forward.experts
    all_counts = [counts[HELD.index(e)] if e in HELD else 0 for e in range(experts)]
    stacks = [bank.stacks[(layer, name)] for name in EXPERTS]
    want = kernels.experts(rows, expert_offsets(all_counts), *full.weights(),
                           lora=ExpertsLoRA(*stacks, row_index=row_slots * experts + row_experts))
    got = shard.compute(layer, counts, rows, row_slots=row_slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = shard.compute(layer, counts, rows)
    assert (got - base)[row_slots > 0].abs().amax() > 1e-3, "the adapters move their rows"
    torch.testing.assert_close(got[row_slots == 0], base[row_slots == 0], rtol=0, atol=0)

    for bad, why in ((row_slots[:-1], "entries"), (row_slots + 3, "row_slots hold"), (row_slots.int(), "int64")):
        with pytest.raises(ValueError, match=why):
            shard.compute(layer, counts, rows, row_slots=bad)
    with pytest.raises(ValueError, match="no adapter loaded"):
        ShardExperts.load(path, HELD).compute(layer, counts, rows, row_slots=row_slots)


def test_a_shard_that_cannot_read_the_adapter_says_so(scout, tmp_path):
    path, _, _ = scout
    with pytest.raises(ValueError, match="cannot read adapter"):
        ShardExperts.load(path, HELD).read_adapter(tmp_path / "missing")


def _sharded_trunk(path, shards):
    trunk = load_model(path, experts=(), progress=False)
    placement = place_experts(trunk.config.num_local_experts, shards)
    transport = InProcessTransport([ShardExperts.load(path, e) for e in placement.shard_experts])
    ExpertDispatcher(placement, transport).attach(trunk)
    return trunk, transport


def _rel_error(ours, ref):
    return float(((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


@pytest.mark.parametrize("preset", ["scout", "maverick"])
def test_sharded_trunk_serves_expert_adapters_like_the_model_holding_its_experts(tmp_path, preset):
    path = make_tiny(tmp_path / "model", preset=preset, seed=4)
    trunk, transport = _sharded_trunk(path, 2)
    full = load_model(path, progress=False)
    config = full.config
    adapters = [load_adapter(make_tiny_lora(tmp_path / f"a{i}", config, rank=4, seed=10 + i,
                                            targets=("experts", "attention")), config) for i in range(3)]
    banks = [model.new_adapter_bank(slots=2, max_rank=8) for model in (trunk, full)]
    assert banks[0].expert_sink is not None and banks[1].expert_sink is None
    for bank in banks:
        bank.load(0, adapters[0])
        bank.load(1, adapters[1])
    assert not any(site[1] in EXPERTS for site in banks[0].stacks), "the trunk holds no expert factors"
    ids = torch.randint(0, config.vocab_size, (18,), generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([-1, 0, 1] * 6)
    want = full(ids, adapter_slots=slots).float()
    assert _rel_error(trunk(ids, adapter_slots=slots).float(), want) < TOLERANCE
    assert _rel_error(full(ids).float(), want) > 100 * TOLERANCE, "the adapters move the logits"

    for bank in banks:  # evict slot 0, then another adapter takes it
        bank.unload(0)
        bank.load(0, adapters[2])
    want = full(ids, adapter_slots=slots).float()
    assert _rel_error(trunk(ids, adapter_slots=slots).float(), want) < TOLERANCE
    fresh = load_model(path, progress=False)
    fresh.new_adapter_bank(slots=2, max_rank=8).load(0, adapters[2])
    only = torch.zeros_like(slots)
    assert _rel_error(trunk(ids, adapter_slots=only).float(), fresh(ids, adapter_slots=only).float()) < TOLERANCE
    banks[0].unload(0)
    banks[0].unload(1)
    assert not banks[0].remote_expert_layers
    for shard in transport.shards:
        assert all(not stack.a.any() and not stack.scaling.any() for stack in shard.adapters.stacks.values())


def test_an_executor_that_cannot_hold_adapters_is_refused_in_the_forward(scout):
    path, config, paths = scout
    trunk = load_model(path, progress=False)
    experts = {m.layer: m.experts for m in trunk.modules() if hasattr(m, "experts") and hasattr(m, "router")}
    trunk.set_experts_executor(lambda layer, rows, offsets: experts[layer](rows, offsets))
    trunk.new_adapter_bank(slots=1, max_rank=8).load(0, load_adapter(paths[0], config))
    with pytest.raises(ValueError, match="cannot hold adapters"):
        trunk(torch.tensor([1, 2, 3]), adapter_slots=torch.tensor([0, 0, -1]))
    assert trunk(torch.tensor([1, 2, 3])).shape[0] == 3, "without adapters a plain function still serves"


def _adapted_logits_match(trunk, path, adapters, seed=0):
    """trunk (its bank loaded with `adapters` in slots 0..) against the model holding its experts."""
    full = load_model(path, progress=False)
    bank = full.new_adapter_bank(slots=len(adapters), max_rank=8)
    for slot, adapter in enumerate(adapters):
        bank.load(slot, adapter)
    ids = torch.randint(0, full.config.vocab_size, (12,), generator=torch.Generator().manual_seed(seed))
    slots = torch.arange(12) % (len(adapters) + 1) - 1  # base and every slot
    want = full(ids, adapter_slots=slots).float()
    assert _rel_error(trunk(ids, adapter_slots=slots).float(), want) < TOLERANCE
    assert _rel_error(full(ids).float(), want) > 100 * TOLERANCE


def test_engine_with_expert_shards_generates_the_adapters_tokens(scout):
    from herd.engine import EngineConfig, LLMEngine, SamplingParams
    from herd.model.tokenizer import Tokenizer

    path, _, paths = scout
    config = EngineConfig(kv_cache_mb=16, max_num_seqs=8, max_loras=1, max_lora_rank=8)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engines = [LLMEngine(_sharded_trunk(path, 2)[0], Tokenizer.from_pretrained(path), config),
               LLMEngine.from_pretrained(path, config)]
    for engine in engines:
        for i, adapter in enumerate(paths[:2]):
            engine.add_adapter(f"a{i}", adapter)
    prompt = list(range(3, 23))
    for adapter in ("a0", "a1", "a0", None):  # one slot: each switch evicts the other adapter
        sharded, alone = (e.generate([prompt], greedy, adapter=adapter)[0].token_ids for e in engines)
        assert sharded == alone, adapter


def test_grpc_shards_take_adapters_by_path_and_refuse_one_they_cannot_read(scout, tmp_path):
    import shutil

    from herd.engine.errors import HerdError
    from herd.model.lora_config import AdapterError
    from herd.workers.expert_shard import serve
    from herd.workers.grpc_transport import GrpcTransport

    path, config, paths = scout
    placement = place_experts(config.num_local_experts, 2)
    servers = [serve(path, experts) for experts in placement.shard_experts]
    transport = GrpcTransport([f"127.0.0.1:{port}" for _, port, _ in servers], timeout_s=20.0)
    try:
        trunk = load_model(path, experts=(), progress=False)
        ExpertDispatcher(placement, transport).attach(trunk)
        bank = trunk.new_adapter_bank(slots=2, max_rank=8)
        adapters = [load_adapter(p, config) for p in paths[:2]]
        for slot, adapter in enumerate(adapters):
            bank.load(slot, adapter)
        _adapted_logits_match(trunk, path, adapters)

        gone = shutil.copytree(paths[2], tmp_path / "gone")
        vanished = load_adapter(gone, config)
        shutil.rmtree(gone)
        with pytest.raises(AdapterError, match="the expert shards cannot hold it"):
            bank.check_fits(vanished)  # what registration calls: refused there, with the shard's reason
        with pytest.raises(HerdError, match="could not ADAPTER_ACTION_LOAD adapter"):
            bank.load(1, vanished)
        assert bank.adapter(1) is None, "the failed load leaves slot 1 empty"
        for _, _, service in servers:
            held = len(service.shard.experts)
            assert all(not stack.scaling[2 * held :].any() for stack in service.shard.adapters.stacks.values())
    finally:
        transport.close()
        for server, _, _ in servers:
            server.stop(0)
