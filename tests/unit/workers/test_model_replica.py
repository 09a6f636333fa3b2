"""A replica's args that no replica may start with are refused before anything is deployed."""

from __future__ import annotations

from typing import Any

import pytest

from herd.workers.model_replica import ModelReplica
from herd.workers.serve_app import build_app

TLS = {"cert_file": "shard.crt", "key_file": "shard.key", "ca_file": "ca.crt"}


@pytest.mark.filterwarnings("ignore:coroutine .ModelReplica.__del__. was never awaited")  # its __init__ raised
@pytest.mark.parametrize("args", [{"shard_listen": "node"}, {"shard_listen": "node", "transport": "ray"}])
def test_shards_on_the_node_address_need_shard_tls(args: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"shard_listen 'node' .* needs shard_tls"):
        build_app(args)
    with pytest.raises(ValueError, match="needs shard_tls"):  # the replica checks before it loads anything
        ModelReplica.func_or_class(args)  # type: ignore[attr-defined]


@pytest.mark.parametrize("args", [
    {},  # loopback, the default
    {"shard_listen": "node", "shard_tls": TLS},
    {"shard_listen": "node", "shards": 0},  # no shard processes: nothing listens
    {"shard_listen": "node", "transport": "local"},
])
def test_what_may_start(args: dict[str, Any]) -> None:
    build_app(args)


@pytest.mark.parametrize(("args", "transport"), [
    ({}, "collective"),  # every shard in the trunk's placement group on one node
    ({"transport": "grpc"}, "grpc"),
    ({"deployment": {"placement_strategy": "PACK"}}, "grpc"),  # shards may be on other nodes
    ({"shard_listen": "node", "shard_tls": TLS}, "grpc"),
    ({"shard_tls": TLS}, "grpc"),  # TLS is gRPC's: asked for, it is kept
    ({"engine": {"device": "cuda"}}, "grpc"),  # NCCL is unproven on a GPU: asked for by name only
    ({"engine": {"device": "cuda"}, "transport": "collective"}, "collective"),
])
def test_auto_picks_the_collective_transport_on_one_cpu_node_and_grpc_otherwise(args: dict[str, Any], transport: str):
    from herd.workers.replica_config import ReplicaArgs

    assert ReplicaArgs.model_validate(args).dispatch_transport == transport


@pytest.mark.filterwarnings("ignore:coroutine .ModelReplica.__del__. was never awaited")  # its __init__ raised
@pytest.mark.parametrize("args", [{"transport": "grpc"}, {"shards": 0}, {"transport": "local"},
                                  {"deployment": {"placement_strategy": "PACK"}}])
def test_expert_balancing_needs_collective_shards(args: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"balance\.enabled needs expert shards over the collective transport"):
        build_app({**args, "balance": {"enabled": True}})
    build_app({"balance": {"enabled": True}})


class _Core:
    def __init__(self, healthy: bool) -> None:
        self._healthy = healthy

    def healthy(self) -> bool:
        return self._healthy


class _Recovery:
    def __init__(self, *, recovering: bool = False, failed: str | None = None, noticed: bool = False) -> None:
        self.recovering, self.failed, self._noticed = recovering, failed, noticed

    def noticed(self) -> bool:
        return self._noticed


@pytest.mark.filterwarnings("ignore:coroutine .ModelReplica.__del__. was never awaited")  # made without __init__
@pytest.mark.parametrize(("core", "recovery", "healthy"), [
    (True, None, True),
    (False, None, False),  # no restarts in place: a dead shard means a replica restart
    (False, _Recovery(recovering=True), True),  # a shard restarting in place: held, not replaced
    (False, _Recovery(noticed=True), True),  # found gone a moment before the recovery noticed it
    (False, _Recovery(), False),  # gone and not restarting (hung, not dead): the replica is replaced
    (True, _Recovery(failed="more than 5 shard restarts"), False),  # the recovery gave up
])
def test_a_replica_restoring_a_shard_in_place_reports_healthy_and_one_whose_recovery_gave_up_does_not(
        core: bool, recovery: _Recovery | None, healthy: bool) -> None:
    from herd.workers.replica_config import ReplicaArgs

    replica = object.__new__(ModelReplica.func_or_class)  # type: ignore[attr-defined]
    replica.args, replica.core, replica.recovery = ReplicaArgs(), _Core(core), recovery
    if healthy:
        replica.check_health()
    else:
        with pytest.raises(RuntimeError, match="replica of scout"):
            replica.check_health()
