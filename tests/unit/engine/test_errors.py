"""HerdError: one type with a code from the engine to the gateway, intact across processes."""

from __future__ import annotations

import pickle

import pytest

from herd.engine.errors import Code, HerdError


def test_an_error_survives_pickling_with_its_code_message_and_details():
    """Ray pickles a replica's or shard's exception to the caller."""
    error = HerdError(Code.RESOURCE_EXHAUSTED, "Limit 'requests_per_min' reached", param="model",
                      reason="requests_per_min", retry_after_s=7)
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, HerdError) and again.code is Code.RESOURCE_EXHAUSTED
    assert (again.message, again.param, again.reason, again.retry_after_s) == (
        "Limit 'requests_per_min' reached", "model", "requests_per_min", 7)
    assert str(again) == "Limit 'requests_per_min' reached"


def test_codes_are_grpc_status_names():
    assert HerdError("UNAVAILABLE", "gone").code is Code.UNAVAILABLE
    assert Code.of("DEADLINE_EXCEEDED") is Code.DEADLINE_EXCEEDED
    assert Code.of("DATA_LOSS") is Code.INTERNAL, "a status Herd does not answer with is an internal error"
    with pytest.raises(ValueError):
        HerdError("NOT_A_CODE", "x")
