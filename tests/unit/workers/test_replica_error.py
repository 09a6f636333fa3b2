"""A replica's error crosses process boundaries (Ray pickles it to the gateway) with its code intact."""

from __future__ import annotations

import pickle

from herd.workers.replica_core import ReplicaError


def test_replica_error_survives_pickling_with_code_and_message():
    error = pickle.loads(pickle.dumps(ReplicaError("UNAVAILABLE", "expert shard at 10.0.0.1:5000: reset")))
    assert isinstance(error, ReplicaError)
    assert (error.code, error.message) == ("UNAVAILABLE", "expert shard at 10.0.0.1:5000: reset")
    assert str(error) == "UNAVAILABLE: expert shard at 10.0.0.1:5000: reset"
