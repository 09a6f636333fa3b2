"""Expert shards as Ray actors (what a Serve replica starts in its placement group), reached by Ray calls
and by gRPC: both give the single-process model's logits."""

from __future__ import annotations

import pytest
import torch

from herd.model import load_model
from herd.model.lora import load_adapter
from herd.model.tiny import make_tiny
from herd.model.tiny_lora import make_tiny_lora
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.placement import place_experts
from herd.workers.ray_transport import RayTransport
from herd.workers.shard_actor import ExpertShardActor
from tests.unit.workers.network import listening_hosts, refused_on_the_network
from tests.waiting import wait_until


def test_shard_actors_over_ray_calls_and_grpc(ray_session, tmp_path):
    path = make_tiny(tmp_path / "scout", preset="scout", seed=13)
    placement = place_experts(16, 2)
    actors = [ExpertShardActor.options(num_cpus=1).remote(str(path), list(e), "float32")
              for e in placement.shard_experts]
    full = load_model(path, progress=False)
    ids = torch.randint(0, full.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    expected = full.logits(ids)
    addresses = ray_session.get([a.address.remote() for a in actors])
    # LoRA on the routed experts: the shards read the adapter from its path, each row's slot goes with it.
    adapter = load_adapter(make_tiny_lora(tmp_path / "adapter", full.config, rank=4, targets=("experts",)),
                           full.config)
    full.new_adapter_bank(slots=2, max_rank=8).load(1, adapter)
    slots = torch.arange(40) % 2 * 2 - 1  # base and slot 1, alternating
    adapted = full(ids, adapter_slots=slots).float()
    for transport in (RayTransport(actors, timeout_s=60), GrpcTransport(addresses)):
        trunk = load_model(path, experts=(), progress=False)
        ExpertDispatcher(placement, transport).attach(trunk)
        assert float((trunk.logits(ids) - expected).norm() / expected.norm()) < 1e-5
        bank = trunk.new_adapter_bank(slots=2, max_rank=8)
        bank.load(1, adapter)
        assert float((trunk(ids, adapter_slots=slots).float() - adapted).norm() / adapted.norm()) < 1e-5
        bank.unload(1)
        assert transport.healthy()
    RayTransport(actors, timeout_s=60).close()


def test_shard_actors_listen_on_loopback_unless_told_and_then_only_with_tls(ray_session, tmp_path):
    path = make_tiny(tmp_path / "scout", preset="scout", seed=13)
    actor = ExpertShardActor.options(num_cpus=1).remote(str(path), [0, 1], "float32")
    address = ray_session.get(actor.address.remote())
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert listening_hosts(int(port)) == {"127.0.0.1"}
    assert refused_on_the_network(int(port))
    assert GrpcTransport([address]).shard_experts() == [(0, 1)]  # the trunk, on the same node, reaches it
    ray_session.kill(actor)
    refused = ExpertShardActor.options(num_cpus=1).remote(str(path), [0, 1], "float32", listen="node")
    with pytest.raises(ray_session.exceptions.RayActorError, match="needs shard_tls"):
        ray_session.get(refused.address.remote())


def test_shard_actors_in_a_collective_group_rendezvous_through_ray(ray_session, tmp_path):
    """What a replica does with transport collective: the trunk opens the store, the actors join by a Ray call
    (serving the group on a thread), and the logits are the single-process model's, bit for bit."""
    from herd.model.config import load_config
    from herd.workers.collective import CollectiveGroup, open_rendezvous
    from herd.workers.collective_transport import CollectiveTransport

    path = make_tiny(tmp_path / "scout", preset="scout", seed=13)
    placement = place_experts(16, 2)
    actors = [ExpertShardActor.options(num_cpus=1).remote(str(path), list(e), "float32")
              for e in placement.shard_experts]
    store, rendezvous = open_rendezvous("127.0.0.1", 3, backend="gloo", timeout_s=120)
    ray_session.get([a.join_collective.remote(rendezvous, rank) for rank, a in enumerate(actors, start=1)])
    text = load_config(path).text
    transport = CollectiveTransport(CollectiveGroup(rendezvous, 0, store=store), num_experts=16,
                                    moe_layers=len(text.moe_layers), hidden_size=text.hidden_size,
                                    dtype=torch.float32, timeout_s=30,
                                    probe=lambda: all(ray_session.get([a.serving.remote() for a in actors])))
    full = load_model(path, progress=False)
    ids = torch.randint(0, full.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    trunk = load_model(path, experts=(), progress=False)
    ExpertDispatcher(placement, transport).attach(trunk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors (num_cpus=1): a GEMM's rounding may depend on its thread count
    try:
        torch.testing.assert_close(trunk.logits(ids), full.logits(ids), rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    assert transport.healthy()
    transport.close()  # the shards leave their loop: no longer serving the group
    assert wait_until(lambda: not any(ray_session.get([a.serving.remote() for a in actors])))
    for actor in actors:
        ray_session.kill(actor)
