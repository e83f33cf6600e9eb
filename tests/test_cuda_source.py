"""Rewrites of TVM's CUDA source (schedules.cuda_source), checked on the source and, where nvcc is
installed, on the PTX it compiles to."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import tvm

from lntune.build import compile_module
from schedules import cuda_source, database
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SM90 = get_target("cuda-sm90")
FOUR_CASTS = re.compile(r"\.x = \((?:nv_bfloat16|half)\)\(\w+\.x\);")


def _source(kernel: Kernel) -> str:
    """The CUDA source TVM generates for `kernel` as selected (with lntune's rewrites applied)."""
    func = database.scheduled(kernel, SM90, database.choose(kernel, SM90).knobs)
    return compile_module(tvm.IRModule({kernel.name: func}), SM90).mod.imports[0].inspect_source()


def test_four_casts_become_two_round_to_nearest_pairs():
    text = """
        __8.x = (nv_bfloat16)(__9.x);
        __8.y = (nv_bfloat16)(__9.y);
        __8.z = (nv_bfloat16)(__9.z);
        __8.w = (nv_bfloat16)(__9.w);
        v.x = (half)(w.x);
        v.y = (half)(w.y);
        v.z = (half)(w.z);
        v.w = (half)(w.w);
        a.x = (half)(b.x);
        a.y = (half)(c.y);"""
    packed = cuda_source.pack_conversions(text)
    assert "*(nv_bfloat162*)&__8.x = __floats2bfloat162_rn(__9.x, __9.y);" in packed
    assert "*(nv_bfloat162*)&__8.z = __floats2bfloat162_rn(__9.z, __9.w);" in packed
    assert "*(half2*)&v.x = __floats2half2_rn(w.x, w.y);" in packed
    assert "*(half2*)&v.z = __floats2half2_rn(w.z, w.w);" in packed
    # Not four casts of one source into one destination: left as it was.
    assert packed.endswith("a.x = (half)(b.x);\n        a.y = (half)(c.y);")
    assert cuda_source.pack_conversions(packed) == packed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generated_16_bit_kernels_convert_in_pairs(dtype):
    """Every float4 -> 16-bit conversion of a backward and a forward goes through pairs."""
    for kernel in (Kernel("backward", 16384, dtype, 66), Kernel("forward", 1024, dtype)):
        source = _source(kernel)
        assert not FOUR_CASTS.search(source), kernel.name
        assert source.count("__floats2") >= 2, kernel.name


def test_a_float32_kernel_is_left_as_it_was():
    source = _source(Kernel("backward", 1024, "float32", 1056))
    assert cuda_source.pack_conversions(source) == source and "__floats2" not in source


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_a_cluster_kernel_stores_its_dx_row_in_one_16_byte_store(tmp_path):
    """With four casts NVVM stored each row of dx as four st.global.v2.u16 in cluster kernels."""
    cu = tmp_path / "kernel.cu"
    cu.write_text(_source(Kernel("backward", 16384, "bfloat16", 66)))
    ptx = tmp_path / "kernel.ptx"
    subprocess.run(["nvcc", "-arch=sm_90a", "-ptx", "-o", str(ptx), str(cu)], check=True, capture_output=True)
    text = ptx.read_text()
    assert "st.global.v2.u16" not in text and "st.global.v4.u32" in text
