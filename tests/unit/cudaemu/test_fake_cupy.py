"""The stand-in cupy (tests.cudaemu.fake_cupy): its launch checks, and that it has all herd.kernels asks of CuPy."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import herd.kernels
from tests.cudaemu import Param, fake_cupy

PARAMS = [Param("x", "const float*"), Param("ids", "const int*"), Param("count", "long long"),
          Param("n", "int"), Param("scale", "float"), Param("out", "unsigned short*")]


def _args(**overrides: Any) -> tuple[Any, ...]:
    args = {"x": fake_cupy.from_dlpack(torch.zeros(4)), "ids": fake_cupy.from_dlpack(torch.zeros(4, dtype=torch.int32)),
            "count": np.int64(4), "n": np.int32(4), "scale": np.float32(0.5),
            "out": fake_cupy.from_dlpack(torch.zeros(4, dtype=torch.bfloat16).view(torch.int16))}
    args.update(overrides)
    return tuple(args.values())


def test_arguments_matching_the_signature_become_addresses_and_numbers() -> None:
    x = torch.zeros(4)
    values = fake_cupy.check_args("k", PARAMS, _args(x=fake_cupy.from_dlpack(x)))
    assert values[0] == x.data_ptr()
    assert values[2:5] == [4, 4, 0.5]
    assert [type(v) for v in values[2:5]] == [int, int, float]


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("n", np.int64(4), "int64"),  # long long where int is asked: CuPy would pack 8 bytes
    ("n", 4, "int"),  # a Python int: CuPy packs it by its own rule, not the parameter's
    ("count", np.int32(4), "int32"),
    ("scale", np.float64(0.5), "float64"),
    ("scale", 0.5, "float"),
    ("n", fake_cupy.from_dlpack(torch.zeros(1, dtype=torch.int32)), "ndarray"),
])
def test_a_scalar_of_the_wrong_type_is_refused_naming_kernel_and_parameter(name: str, value: Any,
                                                                            expected: str) -> None:
    with pytest.raises(TypeError, match=rf"moe_kernel: parameter {name} .*got {expected}"):
        fake_cupy.check_args("moe_kernel", PARAMS, _args(**{name: value}))


@pytest.mark.parametrize(("name", "dtype"), [
    ("ids", torch.int64),  # offsets [G+1] int64 read as int: half the values, garbage
    ("ids", torch.float32),  # the same width, but floats
    ("x", torch.int32),
    ("x", torch.float64),
    ("out", torch.float32),
    ("out", torch.uint8),
])
def test_an_array_of_the_wrong_element_type_is_refused(name: str, dtype: torch.dtype) -> None:
    bad = fake_cupy.from_dlpack(torch.zeros(4, dtype=dtype))
    with pytest.raises(TypeError, match=rf"moe_kernel: parameter {name} .*points to .*got an array of"):
        fake_cupy.check_args("moe_kernel", PARAMS, _args(**{name: bad}))


def test_integer_arrays_of_the_same_width_pass_whatever_their_signedness() -> None:
    """bfloat16 bits travel as int16 for unsigned short; packed int4 words as int32 for unsigned int."""
    params = [Param("packed", "const unsigned int*"), Param("bits", "unsigned short*")]
    args = (fake_cupy.from_dlpack(torch.zeros(2, dtype=torch.int32)),
            fake_cupy.from_dlpack(torch.zeros(2, dtype=torch.int16)))
    assert len(fake_cupy.check_args("k", params, args)) == 2


def test_a_scalar_where_an_array_belongs_is_refused() -> None:
    with pytest.raises(TypeError, match=r"moe_kernel: parameter x .*takes an array, got int64"):
        fake_cupy.check_args("moe_kernel", PARAMS, _args(x=np.int64(0)))


@pytest.mark.parametrize("count", [5, 7])
def test_the_wrong_number_of_arguments_is_refused_listing_the_parameters(count: int) -> None:
    args = _args()
    args = args[:count] if count < len(args) else (*args, np.int32(0))
    with pytest.raises(TypeError, match=r"moe_kernel takes 6 arguments \(const float\* x, .*unsigned short\* out\), "
                                        rf"got {count}"):
        fake_cupy.check_args("moe_kernel", PARAMS, args)


def test_arguments_must_be_a_tuple() -> None:
    with pytest.raises(TypeError, match="moe_kernel: kernel arguments must be a tuple, got list"):
        fake_cupy.check_args("moe_kernel", PARAMS, list(_args()))


def test_a_non_contiguous_array_is_refused() -> None:
    strided = fake_cupy.from_dlpack(torch.zeros(4, 2)[:, 0])
    with pytest.raises(ValueError, match=r"moe_kernel: parameter x .*non-contiguous"):
        fake_cupy.check_args("moe_kernel", PARAMS, _args(x=strided))


def test_from_dlpack_keeps_the_tensor_and_refuses_bfloat16() -> None:
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    array = fake_cupy.from_dlpack(t)
    assert (array.shape, array.dtype, array.size, array.data.ptr) == ((2, 3), np.dtype(np.int32), 6, t.data_ptr())
    with pytest.raises(TypeError, match="bfloat16"):
        fake_cupy.from_dlpack(torch.zeros(2, dtype=torch.bfloat16))


FILL = """
extern "C" __global__ void fill(float* out, int n, float value) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = value + i;
}
"""


def test_a_kernel_runs_on_the_tensors_memory_and_launches_are_recorded() -> None:
    out = torch.zeros(70)
    kernel = fake_cupy.RawModule(code=FILL, options=("-std=c++17",)).get_function("fill")
    with fake_cupy.record_launches() as launches, fake_cupy.cuda.Device(0), fake_cupy.cuda.ExternalStream(0, 0):
        kernel((3,), (32,), (fake_cupy.from_dlpack(out[:65]), np.int32(65), np.float32(1.5)))
    assert torch.equal(out[:65], torch.arange(65) + 1.5) and not out[65:].any()
    assert launches == [fake_cupy.Launch("fill", (3, 1, 1), (32, 1, 1), 0)]


def test_a_launch_outside_torchs_stream_is_refused() -> None:
    kernel = fake_cupy.RawModule(code=FILL).get_function("fill")
    with pytest.raises(ValueError, match=r"fill launched outside cupy\.cuda\.ExternalStream"):
        kernel((1,), (32,), (fake_cupy.from_dlpack(torch.zeros(1)), np.int32(1), np.float32(0)))


@pytest.mark.parametrize("grid", [(1, 1, 1, 1), (), [1], 1, (1.0,), (True,)])
def test_grid_and_block_must_be_tuples_of_one_to_three_ints(grid: Any) -> None:
    kernel = fake_cupy.RawModule(code=FILL).get_function("fill")
    with fake_cupy.cuda.ExternalStream(0), pytest.raises(TypeError, match="fill: grid must be a tuple of 1 to 3 ints"):
        kernel(grid, (32,), (fake_cupy.from_dlpack(torch.zeros(1)), np.int32(1), np.float32(0)))


def test_an_unknown_kernel_name_is_refused_listing_those_there() -> None:
    with pytest.raises(ValueError, match=r"no extern \"C\" __global__ kernel 'fil' .*\['fill'\]"):
        fake_cupy.RawModule(code=FILL).get_function("fil")


def test_orders_and_variants_are_checked() -> None:
    with pytest.raises(ValueError, match="order must be one of"), fake_cupy.launch_order("sideways"):
        pass
    with pytest.raises(ValueError, match="variant must be one of"), fake_cupy.use_variant("msan"):
        pass


def _cupy_uses() -> list[tuple[str, ast.AST]]:
    """(dotted name, node) of every `cupy.<...>` attribute chain in herd/kernels, annotations included."""
    uses: list[tuple[str, ast.AST]] = []
    for path in sorted(Path(herd.kernels.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        top: ast.AST
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "cupy":
                chain, top = ["cupy"], node
                while isinstance(parent := parents.get(top), ast.Attribute):
                    chain.append(parent.attr)
                    top = parent
                uses.append((".".join(chain), parents.get(top, top)))
    return uses


def test_every_name_herd_kernels_uses_of_cupy_exists_in_the_fake_and_takes_the_arguments_given() -> None:
    uses = _cupy_uses()
    names = {name for name, _ in uses}
    assert {"cupy.RawModule", "cupy.from_dlpack", "cupy.cuda.Device", "cupy.cuda.ExternalStream"} <= names
    for name, parent in uses:
        obj: Any = fake_cupy
        for attr in name.split(".")[1:]:
            assert hasattr(obj, attr), f"{name} (used by herd.kernels) is missing from the fake cupy"
            obj = getattr(obj, attr)
        if isinstance(parent, ast.Call) and ast.unparse(parent.func) == name:
            positional = [None] * len(parent.args)
            keywords = {k.arg: None for k in parent.keywords if k.arg is not None}
            inspect.signature(obj).bind(*positional, **keywords)  # TypeError if the fake takes other arguments
