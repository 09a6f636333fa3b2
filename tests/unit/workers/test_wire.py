"""Tensors on the wire: exact round trips, and every malformed tensor refused by name."""

from __future__ import annotations

import pytest
import torch

from herd.protos.herd.v1 import experts_pb2 as pb
from herd.workers.wire import from_wire, to_wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    t = torch.randn(7, 33).to(dtype)
    msg = to_wire(t)
    assert len(msg.data) == t.numel() * t.element_size()
    assert torch.equal(from_wire(msg), t)
    assert from_wire(to_wire(t[:0])).shape == (0, 33)


def test_bytes_are_little_endian_row_major():
    msg = to_wire(torch.tensor([[1.0, 2.0]]))
    assert msg.data == bytes.fromhex("0000803f") + bytes.fromhex("00000040")


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15), "needs 16 bytes, got 15"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "DTYPE_UNSPECIFIED"),
        (pb.Tensor(dtype=57, shape=[1], data=b"\0" * 4), "dtype 57"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 2], data=b""), "negative"),
    ],
)
def test_malformed_tensors(msg, message):
    with pytest.raises(ValueError, match=message):
        from_wire(msg, name="rows")
