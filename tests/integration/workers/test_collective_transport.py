"""Tiny Scout and Maverick served by 2 and 4 expert-shard processes over the replica's collective group (gloo):
exact to the single-process model, quantised experts included, and failing cleanly and in time when a shard dies
or hangs."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.errors import HerdError
from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.model.tokenizer import Tokenizer
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import place_experts
from tests.integration.workers.shard_processes import CollectiveShards
from tests.unit.workers.network import listening_hosts, refused_on_the_network

ENGINE = EngineConfig(kv_cache_mb=16, max_num_seqs=16)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
EXPERTS = {"scout": 16, "maverick": 32}


def _specs(num_experts, shards):
    return [f"{owned[0]}:{owned[-1] + 1}" for owned in place_experts(num_experts, shards).shard_experts]


def _trunk(path, experts, shards):
    trunk = load_model(path, experts=(), progress=False)
    dispatcher = ExpertDispatcher(place_experts(experts, len(shards.specs)), shards.transport)
    dispatcher.attach(trunk)
    return trunk, dispatcher


def _same_as_one_process(path, trunk, *, seeds=(0, 1)):
    full = load_model(path, progress=False)
    for seed in seeds:
        ids = torch.randint(0, full.config.vocab_size, (45,), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(trunk.logits(ids), full.logits(ids), rtol=0, atol=0)
    prompts = [list(range(3, 3 + n)) for n in (5, 20, 37)]
    tokenizer = Tokenizer.from_pretrained(path)
    alone = LLMEngine(full, tokenizer, ENGINE).generate(prompts, GREEDY)
    sharded = LLMEngine(trunk, tokenizer, ENGINE).generate(prompts, GREEDY)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in alone]


@pytest.mark.parametrize("preset", ["scout", "maverick"])
@pytest.mark.parametrize("shards", [2, 4])
def test_logits_and_greedy_tokens_equal_the_single_process_model(tmp_path, preset, shards):
    path = make_tiny(tmp_path / preset, preset=preset, seed=6)
    with CollectiveShards(path, _specs(EXPERTS[preset], shards)) as group:
        trunk, dispatcher = _trunk(path, EXPERTS[preset], group)
        _same_as_one_process(path, trunk)
        assert dispatcher.healthy()
        assert group.transport.stats.calls > 0 and group.transport.stats.serialize_s == 0


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_quantised_experts_over_the_group_equal_the_single_process_model(tmp_path, scheme):
    from herd.model.quant.convert import quantize_checkpoint

    source = make_tiny(tmp_path / "float", preset="maverick", seed=7)
    path = quantize_checkpoint(source, tmp_path / scheme, scheme, progress=False)
    with CollectiveShards(path, _specs(32, 2)) as group:
        trunk, _ = _trunk(path, 32, group)
        _same_as_one_process(path, trunk, seeds=(0,))


def _generating(path, group, timeout_s):
    trunk, dispatcher = _trunk(path, 16, group)
    engine = LLMEngine(trunk, Tokenizer.from_pretrained(path), ENGINE)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    ids = [engine.add_request(list(range(5, 5 + n)), long) for n in (4, 9, 30)]
    for _ in range(3):
        engine.step()
    assert dispatcher.healthy()
    return engine, dispatcher, ids


def _all_fail_with(engine, ids, code, within_s):
    started = time.monotonic()
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert time.monotonic() - started < within_s, "within the dispatch deadline, never a hang"
    assert sorted(finished) == sorted(ids)
    for out in finished.values():
        assert out.finish_reason == "error" and out.error is not None and out.error.code == code, out.error
        assert "127.0.0.1" not in out.error.message, "no internal address in what a client may see"
    assert all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values()), "every KV block freed"


def test_a_killed_shard_fails_the_step_with_unavailable_at_once_and_the_transport_reports_unhealthy(tmp_path):
    path = make_tiny(tmp_path / "scout", preset="scout", seed=7)
    with CollectiveShards(path, _specs(16, 2), timeout_s=20.0) as group:
        engine, dispatcher, ids = _generating(path, group, 20.0)
        group.kill(1)
        _all_fail_with(engine, ids, "UNAVAILABLE", within_s=20.0)
        assert not dispatcher.healthy()
        with pytest.raises(HerdError) as failed:  # the group stays broken: the replica is restarted, not reused
            engine.model.logits(torch.tensor([1, 2, 3]))
        assert failed.value.code == "UNAVAILABLE"


def test_a_hung_shard_fails_the_step_with_deadline_exceeded_within_the_timeout(tmp_path):
    path = make_tiny(tmp_path / "scout", preset="scout", seed=7)
    with CollectiveShards(path, _specs(16, 2), timeout_s=3.0) as group:
        engine, dispatcher, ids = _generating(path, group, 3.0)
        group.procs[0].send_signal(signal.SIGSTOP)
        try:
            _all_fail_with(engine, ids, "DEADLINE_EXCEEDED", within_s=15.0)
            assert not dispatcher.healthy()
        finally:
            group.procs[0].send_signal(signal.SIGCONT)


def test_re_placing_experts_live_moves_their_weights_and_keeps_the_logits(tmp_path):
    """Expert balancing: the shards swap weights among themselves (no reload) into placements with hot experts
    replicated, and moved back; the logits stay exactly the single-process model's at every step."""
    from herd.workers.balance import plan_placement, shard_rows

    path = make_tiny(tmp_path / "maverick", preset="maverick", seed=8)
    full = load_model(path, progress=False)
    ids = torch.randint(0, full.config.vocab_size, (60,), generator=torch.Generator().manual_seed(3))
    expected = full.logits(ids)
    with CollectiveShards(path, _specs(32, 4)) as group:
        trunk, dispatcher = _trunk(path, 32, group)
        torch.testing.assert_close(trunk.logits(ids), expected, rtol=0, atol=0)
        start = dispatcher.placement
        hot = [1.0] * 32
        hot[0], hot[1], hot[2] = 200.0, 120.0, 90.0  # all on shard 0 today
        skewed = plan_placement(hot, 4, slots_per_shard=10)
        assert max(shard_rows(skewed, [int(x) for x in hot])) < max(shard_rows(start, [int(x) for x in hot]))
        assert any(len(holders) > 1 for holders in skewed.replicas.values()), "hot experts get copies"
        for placement in (skewed, plan_placement(list(reversed(hot)), 4, slots_per_shard=9), start):
            dispatcher.replace(placement)
            assert group.transport.shard_experts() == list(placement.shard_experts)
            got = trunk.logits(ids)
            if any(len(holders) > 1 for holders in placement.replicas.values()):
                # A replicated expert's rows are split between its copies: each GEMM has fewer rows, and on some
                # CPUs (seen on AMD EPYC) the BLAS picks kernels by row count that round differently, by about
                # 1e-6. Wrong weights or rows would differ by far more.
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                assert torch.equal(got.argmax(-1), expected.argmax(-1))
            else:
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert dispatcher.healthy()


def test_balancing_between_steps_re_places_while_generating_and_the_tokens_do_not_change(tmp_path):
    from herd.workers.expert_balancer import ExpertBalancer
    from herd.workers.replica_config import ExpertBalance

    path = make_tiny(tmp_path / "scout", preset="scout", seed=9)
    prompts = [list(range(3 + n, 40 + 2 * n)) for n in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokenizer = Tokenizer.from_pretrained(path)
    alone = LLMEngine(load_model(path, progress=False), tokenizer, ENGINE).generate(prompts, params)
    with CollectiveShards(path, _specs(16, 4)) as group:
        trunk, dispatcher = _trunk(path, 16, group)
        balancer = ExpertBalancer(dispatcher, ExpertBalance(enabled=True, interval_steps=3, min_tokens=1,
                                                            spare_slots=2, min_gain=0.0), trunk.config.moe_layers)
        engine = LLMEngine(trunk, tokenizer, ENGINE)
        ids = [engine.add_request(p, params) for p in prompts]
        outputs = {}
        while engine.has_unfinished():
            balancer.between_steps()
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
        assert balancer.replacements >= 1 and balancer.stopped is None
        assert [outputs[i].token_ids for i in ids] == [o.token_ids for o in alone]
        assert group.transport.shard_experts() == list(dispatcher.placement.shard_experts)


def test_the_group_listens_on_loopback_only(tmp_path):
    """The trunk's store and every rank's gloo pairs: nothing of the group is reachable from the network. (This
    process's listeners from before, other tests' servers, are not the group's and are left out.)"""
    import psutil

    def listening(pids):
        return {(c.pid, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.pid in pids}

    here = psutil.Process().pid
    before = listening({here})
    path = make_tiny(tmp_path / "scout", preset="scout", seed=7)
    with CollectiveShards(path, _specs(16, 2)) as group:
        ours = listening({here} | {proc.pid for proc in group.procs}) - before
        ports = {port for _, port in ours}
        assert group.transport.group.rendezvous.port in ports, "the store is among what was checked"
        assert len(ports) >= 3, "the store and a gloo listener per rank"
        for port in ports:
            assert listening_hosts(port) == {"127.0.0.1"}, port
            assert refused_on_the_network(port), port


def test_rows_beyond_what_a_header_message_carries_follow_in_a_second_message(tmp_path):
    from herd.model.config import load_config
    from herd.workers.collective_protocol import inline_rows
    from herd.workers.shard_experts import ShardExperts
    from herd.workers.transport import ShardWork

    path = make_tiny(tmp_path / "scout", preset="scout", seed=7)
    text = load_config(path).text
    inline = inline_rows(text.hidden_size, torch.float32)
    placement = place_experts(16, 2)
    local = [ShardExperts.load(path, experts) for experts in placement.shard_experts]
    with CollectiveShards(path, _specs(16, 2)) as group:
        generator = torch.Generator().manual_seed(0)
        for sizes in ([inline + 37, 3], [inline, 0], [0, 2 * inline + 1]):
            work = []
            for size in sizes:
                counts = [size // 8] * 7 + [size - 7 * (size // 8)]
                work.append(ShardWork(counts=counts, rows=torch.randn(size, text.hidden_size, generator=generator)))
            layer = text.moe_layers[-1]
            got = group.transport.run(layer, work)
            for shard, item, out in zip(local, work, got, strict=True):
                torch.testing.assert_close(out, shard.compute(layer, item.counts, item.rows), rtol=0, atol=0)


def test_adapters_on_the_routed_experts_over_the_group_equal_the_single_process_model(tmp_path):
    """Two adapters and the base model in one batch, a slot refilled with another adapter, and a live re-placement
    (the shards load the resident adapters again for the experts they hold then): logits as the model holding
    every expert and every adapter."""
    import dataclasses

    from herd.model.lora import load_adapter
    from herd.model.lora_config import AdapterError
    from herd.model.tiny_lora import make_tiny_lora
    from herd.workers.balance import plan_placement

    path = make_tiny(tmp_path / "scout", preset="scout", seed=6)
    full = load_model(path, progress=False)
    paths = [make_tiny_lora(tmp_path / f"a{i}", full.config, rank=4, seed=i, targets=("experts",)) for i in range(3)]
    adapters = [load_adapter(p, full.config) for p in paths]
    ids = torch.randint(0, full.config.vocab_size, (30,), generator=torch.Generator().manual_seed(0))
    slots = torch.arange(30) % 3 - 1  # base, slot 0, slot 1
    hot = [1.0] * 16
    hot[0], hot[1] = 200.0, 120.0  # both on shard 0
    with CollectiveShards(path, _specs(16, 2)) as group:
        trunk, dispatcher = _trunk(path, 16, group)
        banks = [model.new_adapter_bank(slots=2, max_rank=8) for model in (trunk, full)]
        for loads, placement in (([(0, 0), (1, 1)], None), ([(0, 2)], None),  # then slot 0 takes another adapter
                                 ([], plan_placement(hot, 2, slots_per_shard=10))):
            for bank in banks:
                for slot, which in loads:
                    bank.load(slot, adapters[which])
            if placement is not None:
                dispatcher.replace(placement)
                assert any(len(holders) > 1 for holders in placement.replicas.values()), "hot experts get copies"
            want = full(ids, adapter_slots=slots).float()
            got = trunk(ids, adapter_slots=slots).float()
            assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()) < 1e-5
            assert not torch.allclose(want, full(ids).float(), rtol=1e-3, atol=1e-3), "the adapters move the logits"
        banks[0].unload(0)
        banks[0].unload(1)
        torch.testing.assert_close(trunk.logits(ids), full.logits(ids), rtol=1e-4, atol=1e-5)  # no stale factors
        with pytest.raises(AdapterError, match="the expert shards cannot hold it"):  # registration's check
            banks[0].check_fits(dataclasses.replace(adapters[0], path=tmp_path / "nowhere"))
        torch.testing.assert_close(trunk.logits(ids), full.logits(ids), rtol=1e-4, atol=1e-5)  # still serving
