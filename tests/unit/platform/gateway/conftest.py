"""A gateway over a replica in this process (no Ray): the tiny Scout with 2 in-process expert shards."""

from __future__ import annotations

import pytest

from herd.engine import EngineConfig
from herd.model.tiny import make_tiny
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore


@pytest.fixture(scope="package")
def tiny_path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=11)


@pytest.fixture(scope="package")
def core(tiny_path):
    config = ReplicaConfig(name="scout", path=str(tiny_path), shards=2, transport="local",
                           engine=EngineConfig(kv_cache_mb=16, max_num_seqs=16, max_model_len=512))
    return ReplicaCore(config)


@pytest.fixture
def gateway(core):
    return Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=2)})
