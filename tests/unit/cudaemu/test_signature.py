"""kernel_signatures reads each extern "C" __global__ kernel's parameters as the launchers must pass them."""

from __future__ import annotations

import pytest

from herd.kernels.cuda_sources import source
from tests.cudaemu import Param, kernel_signatures


def test_herds_permute_signatures():
    signatures = kernel_signatures(source("permute"))
    assert signatures["moe_histogram"] == [Param("ids", "const int*"), Param("rows", "int"),
                                           Param("rank", "const long long*"), Param("counts", "int*")]
    assert [p.type for p in signatures["moe_gather_scale_bf16"]] == [
        "const unsigned short*", "const unsigned short*", "const int*", "int", "int", "int", "unsigned short*"]
    assert "gather_scale" not in signatures  # a __device__ template, not a kernel


def test_herds_int4_signatures():
    signatures = kernel_signatures(source("int4"))
    partial = signatures["int4_gemv_partial_f32"]
    assert [(p.name, p.is_pointer, p.element) for p in partial[:3]] == [
        ("x", True, "float"), ("packed", True, "unsigned int"), ("scales", True, "unsigned short")]
    assert signatures["int4_gemv_reduce_bf16"][2] == Param("count", "long long")


def test_spacing_restrict_comments_and_no_parameters():
    text = """
    // extern "C" __global__ void commented_out(int x) {}
    extern "C"   __global__ void  spaced ( const  float  *  __restrict__  a , unsigned   int n,float**b ) {}
    /* extern "C" __global__ void also_commented(int y) {} */
    extern "C" __global__ void __launch_bounds__(256) nothing(void) {}
    extern "C" __global__ void empty() {}
    """
    signatures = kernel_signatures(text)
    assert signatures == {
        "spaced": [Param("a", "const float*"), Param("n", "unsigned int"), Param("b", "float**")],
        "nothing": [],
        "empty": [],
    }
    assert Param("n", "unsigned int").element == "unsigned int"
    assert not Param("n", "unsigned int").is_pointer
    assert Param("b", "float**").element == "float*"


def test_an_unreadable_parameter_is_an_error():
    with pytest.raises(ValueError, match=r"kernel bad: cannot read the parameter 'int' as a C type and a name"):
        kernel_signatures('extern "C" __global__ void bad(int) {}')
