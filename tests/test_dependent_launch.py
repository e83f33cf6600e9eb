"""The partials sum launched as a programmatic dependent of the backward (schedules.dependent_launch),
checked where CI can: the kernels' CUDA source and the launch flags a built library carries. Whether
the overlap pays was measured on the H100 (docs/performance.md, section 9)."""

from __future__ import annotations

import pytest
import tvm

from lntune.build import compile_module, device_source, kernels_for
from schedules import database, dependent_launch, pipeline
from schedules.targets import get_target

SM90 = get_target("cuda-sm90")


def _backward_pair(target, hidden: int = 1024, dtype: str = "bfloat16") -> tvm.IRModule:
    kernels = kernels_for(hidden, dtype, target)[2:]  # backward and backward_sum
    return tvm.IRModule({k.name: database.scheduled(k, target, database.choose(k, target).knobs) for k in kernels})


def _definition(source: str, name: str) -> str:
    """The body of kernel `name` in a CUDA source (after its forward declaration, if any)."""
    start = source.rindex(f" {name}_kernel(")
    end = source.find('extern "C"', start)
    return source[start : None if end < 0 else end]


@pytest.mark.parametrize("hidden, dtype", [(1024, "bfloat16"), (16384, "float32")])
def test_the_sum_waits_for_the_backward_before_it_reads_a_partial(hidden, dtype):
    mod = _backward_pair(SM90, hidden, dtype)
    source = device_source(mod, SM90)
    backward, total = (k.name for k in kernels_for(hidden, dtype, SM90)[2:])
    body = _definition(source, total)
    assert body.count("lntune_wait_for_prerequisites();") == 1
    assert body.index("lntune_wait_for_prerequisites();") < body.index("part_ptr[")
    assert "griddepcontrol.wait;" in source
    # The backward allows the launch only as its blocks exit (an early trigger measured slower).
    body = _definition(source, backward)
    assert "lntune_allow_dependents();" not in body and "lntune_wait_for_prerequisites();" not in body


def test_a_primary_allows_its_dependents_from_one_thread():
    kernel = kernels_for(4096, "float32", SM90)[2]
    func = dependent_launch.with_dependency(
        database.scheduled(kernel, SM90, database.choose(kernel, SM90).knobs), "primary"
    )
    assert dependent_launch.DEPENDENT_KEY not in func.attrs
    source = device_source(tvm.IRModule({kernel.name: func}), SM90)
    assert _definition(source, kernel.name).count("lntune_allow_dependents();") == 1
    assert "if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)" in source


def test_only_the_sum_kernel_is_launched_as_a_dependent(tmp_path):
    """The flag TVM's runtime reads lands on the sum's device kernel alone, in the exported library."""
    mod = _backward_pair(SM90)
    lower = pipeline.factory()[0]  # lntune's lowering (registered with TVM only inside its builds)
    out = lower(tvm.tirx.transform.BindTarget(tvm.target.Target(SM90.spec, host="llvm"))(mod))
    flags = {
        gv.name_hint: [str(t) for t in f.attrs["tirx.kernel_launch_params"]]
        for gv, f in out.functions.items()
        if f.attrs and "tirx.kernel_launch_params" in f.attrs
    }
    assert len(flags) == 2
    for name, tags in flags.items():
        assert (dependent_launch.LAUNCH_TAG in tags) == ("backward_sum" in name), (name, tags)
    path = tmp_path / "pair.so"
    compile_module(mod, SM90).export_library(str(path))
    assert path.read_bytes().count(dependent_launch.LAUNCH_TAG.encode()) == 1


def test_the_launch_flag_goes_before_dynamic_shared_memory():
    tag, dyn = dependent_launch.LAUNCH_TAG, dependent_launch.DYNAMIC_SHARED_TAG
    assert dependent_launch.with_launch_tag(["blockIdx.x", "threadIdx.x"]) == ["blockIdx.x", "threadIdx.x", tag]
    assert dependent_launch.with_launch_tag(["blockIdx.x", dyn]) == ["blockIdx.x", tag, dyn]
    assert dependent_launch.with_launch_tag(["blockIdx.x", tag]) == ["blockIdx.x", tag]


@pytest.mark.parametrize("name", ["cuda-sm80", "rocm-gfx942", "llvm"])
def test_targets_without_dependent_launch_get_plain_kernels(name):
    target = get_target(name)
    for func in _backward_pair(target).functions.values():
        assert dependent_launch.DEPENDENT_KEY not in (func.attrs or {})
        assert "lntune_allow_dependents" not in func.script() and "lntune_wait_for" not in func.script()


def test_a_dependency_needs_a_kernel_and_a_known_role():
    func = next(iter(_backward_pair(SM90).functions.values()))
    with pytest.raises(ValueError, match="role must be one of"):
        dependent_launch.with_dependency(func, "secondary")
