"""Rewrites of TVM's CUDA source (schedules.cuda_source), checked on the source and, where nvcc is
installed, on the PTX it compiles to."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from lntune.build import kernel_source
from schedules import cuda_source
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SM90 = get_target("cuda-sm90")
FOUR_CASTS = re.compile(r"\.x = \((?:nv_bfloat16|half)\)\(\w+\.x\);")


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
        source = kernel_source(kernel, SM90)
        assert not FOUR_CASTS.search(source), kernel.name
        assert source.count("__floats2") >= 2, kernel.name


def test_a_rewrite_can_be_left_out_for_one_build_and_comes_back_after():
    kernel = Kernel("forward", 1024, "bfloat16")
    with cuda_source.without("pack_conversions"):
        assert FOUR_CASTS.search(kernel_source(kernel, SM90))
    assert not FOUR_CASTS.search(kernel_source(kernel, SM90))
    with pytest.raises(ValueError, match="no CUDA source rewrite named 'packing'"):
        with cuda_source.without("packing"):
            pass


def test_a_float32_kernel_is_left_as_it_was():
    source = kernel_source(Kernel("backward", 1024, "float32", 1056), SM90)
    assert cuda_source.pack_conversions(source) == source and "__floats2" not in source


def test_16_byte_global_stores_go_through_stwb_and_nothing_else_does():
    signature = "k(float* __restrict__ y_ptr, nv_bfloat16* __restrict__ dx_ptr, int64_t M)"
    text = f"""extern "C" __global__ void __launch_bounds__(1024, 1) __cluster_dims__(2, 1, 1) {signature};
extern "C" __global__ void __launch_bounds__(1024, 1) __cluster_dims__(2, 1, 1) {signature} {{
  alignas(64) nv_bfloat16 dx_local_ptr[8];
      *(uint4*)(dx_ptr + (((int64_t)threadIdx.x) * (int64_t)8)) = *(uint4*)(dx_local_ptr + (int64_t)0);
    *(float4*)(y_ptr + (int64_t)4) = make_float4(a, b, c, d);
    *(float4*)(((float*)buf_dyn_shmem_ptr) + (int64_t)4) = v;
    *(uint4*)(dx_local_ptr + 0) = *(uint4*)(dx_ptr + 8);
    y_ptr[0] = 1.0f;
}}"""
    whole = cuda_source.whole_vector_stores(text)
    assert (
        "      __stwb((uint4*)(dx_ptr + (((int64_t)threadIdx.x) * (int64_t)8)), *(uint4*)(dx_local_ptr + (int64_t)0));"
        in whole
    )
    assert "    __stwb((float4*)(y_ptr + (int64_t)4), make_float4(a, b, c, d));" in whole
    # Shared and local stores, loads from global memory and scalar stores stay as they were.
    kept = [
        line for line in text.splitlines() if "= *(uint4*)(dx_local_ptr" not in line and "= make_float4" not in line
    ]
    assert whole.count("__stwb") == 2 and all(line in whole.splitlines() for line in kept)
    assert cuda_source.whole_vector_stores(whole) == whole


def _ptx(source: str, tmp_path) -> str:
    cu, ptx = tmp_path / "kernel.cu", tmp_path / "kernel.ptx"
    cu.write_text(source)
    subprocess.run(["nvcc", "-arch=sm_90a", "-ptx", "-o", str(ptx), str(cu)], check=True, capture_output=True)
    return ptx.read_text()


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
@pytest.mark.parametrize("kernel", [Kernel("backward", 16384, "bfloat16", 66), Kernel("forward", 1024, "float16")])
def test_rows_of_16_bit_outputs_leave_in_one_16_byte_store(kernel, tmp_path):
    """NVVM split a 16-byte row store into four st.global.v2.u16 from four casts, and into four
    st.global.u32 from pairs (cluster backwards, forwards at N = 768 and 1024); through __stwb it
    stays one."""
    text = _ptx(kernel_source(kernel, SM90), tmp_path)
    assert "st.global.wb.v4.u32" in text
    assert not re.search(r"st\.global(\.wb)?\.(u32|v2\.u16|u16)\s", text), kernel.name
