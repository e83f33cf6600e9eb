"""Mixed precision: 16-bit x, dy, y, dx beside float32 gamma, beta, dgamma, dbeta (AMP, FSDP master
weights), one kernel each, named apart from the one-dtype kernels, with their knobs transferred."""

import json
import re
import warnings

import numpy as np
import pytest

from lntune import toolchain
from lntune.build import _check_request, export, kernel_source, kernels_for
from lntune.runner import load, numpy_dtype
from schedules import database, estimates
from schedules.targets import get_target
from te_ops import reference
from te_ops.layer_norm import DTYPE_SPECS, Kernel, dtype_spec, parse_dtype_spec

HIDDEN = (1, 7, 1000, 4096)
MIXED = ("bfloat16", "float16")
SM90 = get_target("cuda-sm90")


def test_kernel_takes_float32_parameters_beside_16_bit_activations_only():
    mixed = Kernel("backward", 1024, "bfloat16", 264, param_dtype="float32")
    assert mixed.name == "lntune_backward_bfloat16_float32_n1024_p264" and mixed.params == "float32"
    assert Kernel("forward", 1024, "float16", param_dtype="float32").name == "lntune_forward_float16_float32_n1024"
    # The same dtype throughout is the plain kernel: same name, equal, one hash.
    same = Kernel("forward", 1024, "bfloat16", param_dtype="bfloat16")
    assert same == Kernel("forward", 1024, "bfloat16") and same.param_dtype is None
    for dtype, params in (("float32", "bfloat16"), ("bfloat16", "float16"), ("float16", "float64")):
        with pytest.raises(ValueError, match="param_dtype must be"):
            Kernel("forward", 1024, dtype, param_dtype=params)
    with pytest.raises(ValueError, match="forward_stats has no parameters"):
        Kernel("forward_stats", 1024, "bfloat16", param_dtype="float32")


def test_dtype_specs_parse_and_bad_ones_name_what_is_allowed(tmp_path):
    assert parse_dtype_spec("bfloat16:float32") == ("bfloat16", "float32")
    assert parse_dtype_spec("float16") == ("float16", None)
    assert all(dtype_spec(*parse_dtype_spec(spec)) == spec for spec in DTYPE_SPECS)
    hidden, dtypes = _check_request([64, 64], ["float32", "bfloat16:float32", "bfloat16:float32", "bfloat16"])
    assert hidden == [64] and dtypes == [("float32", None), ("bfloat16", "float32"), ("bfloat16", None)]
    for bad in ("float32:bfloat16", "bfloat16:float16", "bf16:float32", "bfloat16:"):
        with pytest.raises(ValueError, match=r"dtype must be .*bfloat16:float32"):
            export("llvm", [64], [bad], tmp_path)
    assert not any(tmp_path.iterdir())


def test_kernels_for_a_mixed_variant_share_the_plain_forward_stats():
    target = get_target("llvm")
    plain = kernels_for(1000, "bfloat16", target)
    mixed = kernels_for(1000, "bfloat16", target, param_dtype="float32")
    assert [k.op for k in mixed] == ["forward", "forward_stats", "backward", "backward_sum"]
    assert mixed[1] == plain[1]
    assert all(m.param_dtype == "float32" and m.name != p.name for m, p in zip(mixed, plain) if m.op != "forward_stats")
    assert all((m.parts, m.granule) == (p.parts, p.granule) for m, p in zip(mixed, plain))


@pytest.fixture(scope="module")
def mixed_library(tmp_path_factory):
    """One small llvm library: both mixed specs and plain bfloat16 at HIDDEN (~5 s)."""
    out = tmp_path_factory.mktemp("mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export("llvm", HIDDEN, ["bfloat16:float32", "float16:float32", "bfloat16"], out, log=lambda *_: None)
    return out


def test_manifest_names_each_variants_parameter_dtype(mixed_library):
    variants = json.loads((mixed_library / "manifest.json").read_text())["variants"]
    assert len(variants) == 4 * len(HIDDEN) * 3 and all("param_dtype" in v for v in variants)
    by_key = {(v["op"], v["hidden"], v["dtype"], v["param_dtype"]): v["function"] for v in variants}
    for n in HIDDEN:
        assert by_key["forward", n, "bfloat16", "float32"] == f"lntune_forward_bfloat16_float32_n{n}"
        assert by_key["forward", n, "bfloat16", "bfloat16"] == f"lntune_forward_bfloat16_n{n}"
        # forward_stats has no parameters: the mixed entry names the plain kernel
        assert by_key["forward_stats", n, "bfloat16", "float32"] == by_key["forward_stats", n, "bfloat16", "bfloat16"]
        assert by_key["backward_sum", n, "float16", "float32"].startswith("lntune_backward_sum_float16_float32_")


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", MIXED)
def test_mixed_values_and_gradients_match_float64(mixed_library, dtype, hidden):
    """Through the runner: 16-bit x and dy with float32 gamma and beta dispatch to the mixed kernels;
    y and dx come back 16-bit, dgamma and dbeta float32 with float32 accuracy."""
    lib = load(mixed_library)
    rng = np.random.default_rng()
    act = numpy_dtype(dtype)
    x = (rng.standard_normal((37, hidden)) + 3).astype(act)
    dy = rng.standard_normal((37, hidden)).astype(act)
    gamma = (1 + 0.5 * rng.standard_normal(hidden)).astype(np.float32)
    beta = rng.standard_normal(hidden).astype(np.float32)
    y, mean, rstd = lib.forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = lib.backward(dy, x, mean, rstd, gamma)
    assert y.dtype == act and dx.dtype == act and dgamma.dtype == np.float32 and dbeta.dtype == np.float32
    want_y, want_mean, want_rstd = reference.forward(x, gamma, beta, 1e-5)
    want_dx, want_dgamma, want_dbeta = reference.backward(dy, x, mean, rstd, gamma)
    tol, tol32 = reference.TOLERANCE[dtype], reference.TOLERANCE["float32"]
    for name, got, want, bound in (
        ("y", y, want_y, tol),
        ("mean", mean, want_mean, tol32),
        ("rstd", rstd, want_rstd, tol32),
        ("dx", dx, want_dx, tol),
        ("dgamma", dgamma, want_dgamma, tol32),
        ("dbeta", dbeta, want_dbeta, tol32),
    ):
        assert reference.rel_error(got, want) <= bound, name


def test_mixed_kernels_take_the_same_activation_kernels_choice():
    """No records or selections of their own: the bfloat16 kernel's verdict, tuned record or
    baseline, labelled as transferred (committed cuda-sm90 logs)."""
    records = database.read_records(database.TUNING_LOGS / SM90.name)
    selection = database.read_selection(database.TUNING_LOGS / SM90.name)
    for hidden, op in ((16384, "forward"), (4096, "backward"), (768, "forward")):
        parts, granule = database.selected_chunking(SM90, hidden, "bfloat16", selection)
        chunking = dict(parts=parts, granule=granule) if op == "backward" else {}
        plain = Kernel(op, hidden, "bfloat16", **chunking)
        mixed = Kernel(op, hidden, "bfloat16", param_dtype="float32", **chunking)
        want, got = (database.choose(k, SM90, records, selection) for k in (plain, mixed))
        assert got.knobs == want.knobs
        if want.source == "baseline":
            assert got.source == "baseline"
        else:
            assert got.source == f"transfer:bfloat16-params:{want.source}"
    assert got.source == "baseline"  # forward N = 768 has neither records nor a verdict


def test_register_estimate_counts_float32_gamma():
    plain, mixed = (
        Kernel("backward", 4096, "bfloat16", 264),
        Kernel("backward", 4096, "bfloat16", 264, param_dtype="float32"),
    )
    knobs = {**database.baseline_knobs(plain, SM90), "cache_gamma": 1, "stage_rows": 0}
    per_thread = 4096 // knobs["threads"]
    assert estimates.registers_needed(mixed, knobs) - estimates.registers_needed(plain, knobs) == per_thread // 2


def test_cuda_mixed_backward_caches_float32_gamma_4_lanes_at_a_time():
    """float32 gamma cached 8 wide beside 16-bit rows came out as 32-byte ulonglong4 copies (no CUDA
    float8); read 4 wide it is float4."""
    kernel = Kernel("backward", 1024, "bfloat16", 1056, param_dtype="float32")
    knobs = {**database.baseline_knobs(kernel, SM90), "cache_gamma": 1, "stage_rows": 0}
    source = kernel_source(kernel, SM90, knobs)
    assert re.search(r"\*\(float4\*\)\(gamma_local_ptr \+ \d+\) = \*\(float4\*\)\(gamma_ptr", source)
    assert not re.search(r"(ulonglong|longlong|double)4", source)


@pytest.mark.parametrize("hidden", [1024, 16384])
def test_cuda_mixed_variant_compiles_without_a_stack_frame(tmp_path, hidden):
    """Every kernel of the variant (N = 16384: the cluster backward) compiles with nvcc for sm_90."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = export("cuda-sm90", [hidden], ["bfloat16:float32"], tmp_path, log=lambda *_: None)
    assert {v["function"] for v in manifest["variants"]} == {
        k.name for k in kernels_for(hidden, "bfloat16", SM90, param_dtype="float32")
    }
    assert manifest["device_code"] == "cubin"
    from lntune.inspect import embedded_cuda_resources

    facts = embedded_cuda_resources((tmp_path / "lntune.so").read_bytes())
    assert len(facts) == 4 and all(f["stack"] == 0 for f in facts.values()), facts


def test_rocm_exports_a_mixed_variant(tmp_path):
    try:
        toolchain.prepare_rocm()
    except RuntimeError as err:
        pytest.skip(str(err))
    from lntune import isa

    manifest = export("rocm-gfx942", [1024], ["bfloat16:float32"], tmp_path, log=lambda *_: None)
    assert manifest["device_code"] == "hsaco"
    if not isa.llvm_tool("llvm-objdump"):
        pytest.skip("needs llvm-objdump 17+ for the ISA")
    facts = isa.library_facts(tmp_path / "lntune.so", manifest["target_spec"]["mcpu"])
    for v in manifest["variants"]:
        f = facts[v["function"]]
        assert f["private"] == 0 and f["vgpr_spills"] == 0 and f["sgpr_spills"] == 0, (v["function"], f)
