"""The command line: every argument checked before any work (one line, exit 2), problems with an
export reported in one line, `~` expanded, `bench --step`, and `check` of mixed-precision variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lntune import check, cli, files
from lntune.build import export
from lntune.cli import main
from lntune.runner import load


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """A small llvm export (N = 8, float32)."""
    out = tmp_path_factory.mktemp("cli") / "lib"
    export("llvm", [8], ["float32"], out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory) -> Path:
    """A small llvm export with a plain and a mixed-precision variant (bfloat16 rows, float32 gamma)."""
    out = tmp_path_factory.mktemp("cli") / "mixed"
    export("llvm", [8], ["float32", "bfloat16:float32"], out, log=lambda *_: None)
    return out


def _fails(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "LIB", "--rows", ""], "argument --rows: expected a comma-separated list of positive integers"),
        (["check", "LIB", "--rows", "1,0"], "argument --rows"),
        (["check", "LIB", "--rows", "1,,2"], "argument --rows"),
        (["export", "--hidden", "", "-o", "OUT"], "argument --hidden"),
        (["export", "--hidden", "8", "--dtype", "", "-o", "OUT"], "argument --dtype"),
        (["export", "--hidden", "8", "--dtype", "float64", "-o", "OUT"], "--dtype: unknown 'float64'"),
        (["export", "--hidden", "8", "--dtype", "float32:bfloat16", "-o", "OUT"], "bfloat16:float32"),
        (["export", "--target", "nope", "--hidden", "8", "-o", "OUT"], "error: target must be one of"),
        (["export", "--hidden", "8", "-o", ""], "argument -o/--output: expected a path"),
        (["export", "--hidden", "8", "-o", "FILE"], "is a file"),
        (["export", "--hidden", "8", "-o", "FILE/lib"], "cannot be created"),
        (["export", "--hidden", "8", "-o", "OUT", "--tuning-logs", "MISSING"], "--tuning-logs"),
        (["tune", "--target", "llvm", "--hidden", "8", "--trials", "0"], "argument --trials: expected a positive"),
        (["tune", "--target", "llvm", "--hidden", "8", "--ops", "fowrard"], "expected some of forward, forward_stats"),
        (["tune", "--target", "llvm", "--hidden", "8", "--dtype", "bfloat16:float32"], "--dtype: unknown"),
        (["tune", "--target", "llvm", "--hidden", "8", "--workers", "0"], "argument --workers"),
        (["tune", "--target", "llvm", "--hidden", "8", "--builder-timeout", "nan"], "argument --builder-timeout"),
        (["tune", "--target", "llvm", "--hidden", "8", "--local-gpus", "0,x"], "argument --local-gpus"),
        (["tune", "--target", "sm90", "--hidden", "8"], "target must be one of"),
        (["prune", "--target", "llvm", "--hidden", "8", "--keep", "0"], "argument --keep"),
        (["prune", "--target", "llvm", "--hidden", "8", "--log-dir", "MISSING"], "--log-dir"),
        (["select", "--target", "llvm", "--hidden", "8", "--ops", "back"], "--ops: unknown 'back'"),
        (["select", "--target", "llvm", "--hidden", "8", "--elements", "-1"], "argument --elements"),
        (["bench"], "the library (an export folder) is required, except with --step"),
        (["bench", "MISSING"], "is not a folder"),
        (["bench", "--step", "--shapes", "2048x"], "argument --shapes"),
        (["bench", "--step", "--configs", "bf16,bf17"], "--configs: unknown 'bf17'"),
        (["bench", "LIB", "--peers", "aten,nope"], "--peers: unknown 'nope'"),
        (["inspect", ""], "argument library: expected a path"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    """One line on stderr, exit 2, and nothing written (the output folder is not created)."""
    monkeypatch.setattr("lntune.build.compile_module", lambda *a: pytest.fail("worked before the check"))
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "LIB").mkdir()
    names = {"OUT": tmp_path / "out", "FILE": tmp_path / "FILE", "LIB": tmp_path / "LIB", "MISSING": tmp_path / "no"}
    argv = [str(names[a]) if a in names else a.replace("FILE/", f"{tmp_path / 'FILE'}/") for a in argv]
    _fails(argv, message, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "LIB"]


def test_check_and_inspect_report_a_bad_export_in_one_line(small_export, tmp_path, capsys):
    _fails(["check", str(tmp_path / "missing")], "no such folder", capsys)
    _fails(["inspect", str(tmp_path / "missing")], "no such folder", capsys)
    folder = tmp_path / "bad"
    shutil.copytree(small_export, folder)
    (folder / files.MANIFEST).write_text("{}")
    _fails(["check", str(folder)], f"{folder / files.MANIFEST}: 'target' must be a non-empty string", capsys)
    _fails(["inspect", str(folder / files.LIBRARY)], "'target' must be", capsys)
    shutil.copy(small_export / files.MANIFEST, folder / files.MANIFEST)
    blob = (folder / files.LIBRARY).read_bytes()
    (folder / files.LIBRARY).write_bytes(blob[:1000])
    _fails(["check", str(folder)], f"{folder / files.LIBRARY}: is 1000 bytes, but the manifest records", capsys)


def test_paths_expand_the_home_directory(small_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(small_export, tmp_path / "lib")
    assert main(["inspect", "~/lib"]) == 0
    assert "lntune_forward_float32_n8" in capsys.readouterr().out
    assert main(["check", "~/lib/lntune.so", "--rows", "3"]) == 0
    assert "8 passed, 0 failed" in capsys.readouterr().out  # 1 variant x 1 M x 8 outputs


def test_bench_step_calls_step_bench_with_the_parsed_arguments(tmp_path, monkeypatch, capsys):
    from lntune import step_bench

    calls = []
    monkeypatch.setattr(step_bench, "run", lambda **kwargs: calls.append(kwargs) or tmp_path / "step.md")
    argv = ["bench", "--step", "--shapes", "2048x768,4096X1024", "--out", str(tmp_path), "--tag=-t"]
    assert main(argv) == 0
    assert calls == [
        dict(
            library=None,
            shapes=[(2048, 768), (4096, 1024)],
            configs=["bf16", "fp32", "bf16-fp32params"],
            out=tmp_path,
            tag="-t",
        )
    ]
    assert main(["bench", str(tmp_path), "--step", "--configs", "fp16"]) == 0
    assert calls[-1]["library"] == tmp_path and calls[-1]["configs"] == ["fp16"] and calls[-1]["shapes"] is None


def test_the_lists_the_command_line_checks_against_are_the_libraries():
    from lntune import step_bench
    from te_ops import layer_norm

    assert files.OPS == layer_norm.OPS and files.DTYPES == layer_norm.DTYPES
    assert sorted(cli.DTYPE_SPECS) == sorted(layer_norm.DTYPE_SPECS)
    assert sorted(cli.STEP_CONFIGS) == sorted(step_bench.CONFIGS)


def test_check_uses_the_parameters_dtype_for_dgamma_and_dbeta(mixed_export):
    """A mixed variant's dgamma/dbeta are float32 and held to float32's tolerance, so one rounded to
    bfloat16 on the way out (what a 16-bit parameter path would do) fails the check."""
    lib = load(mixed_export)
    assert (8, "bfloat16", "float32") in lib.variants
    rows = check.check_variant(lib, 8, "bfloat16", 37, np.random.default_rng(), "float32")
    tolerances = {r.output: r.tolerance for r in rows}
    assert tolerances["dgamma"] == tolerances["mean"] == 3e-5 and tolerances["y"] == 1.6e-2
    assert all(r.ok for r in rows) and {r.variant for r in rows} == {"bfloat16:float32"}
    real = lib.kernel

    def rounding(op, *key):
        function = real(op, *key)
        if op != "backward_sum":
            return function

        def rounded(*args):
            function(*args)
            for out in args[-2:]:  # dgamma, dbeta through bfloat16
                out.copyfrom(out.numpy().astype(ml_dtypes.bfloat16).astype(np.float32))

        return rounded

    lib.kernel = rounding
    rows = check.check_variant(lib, 8, "bfloat16", 37, np.random.default_rng(), "float32")
    assert {r.output for r in rows if not r.ok} == {"dgamma", "dbeta"}


def test_check_rejects_an_empty_row_list(small_export):
    with pytest.raises(ValueError, match="rows must be a non-empty list"):
        check.check_library(load(small_export), [])


def test_export_keeps_other_files_and_records_the_library(small_export, tmp_path):
    out = tmp_path / "lib"
    shutil.copytree(small_export, out)
    (out / "check.txt").write_text("a log\n")
    manifest = export("llvm", [16], ["float32"], out, log=lambda *_: None)
    assert (out / "check.txt").read_text() == "a log\n"
    assert manifest["library_bytes"] == (out / files.LIBRARY).stat().st_size
    assert manifest["library_sha256"] == files.file_digest(out / files.LIBRARY)
    assert json.loads((out / files.MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]  # no lock, no staging folder left


def test_a_reader_that_leaves_early_is_not_an_error(small_export):
    """`lntune inspect DIR | head -1`: the closed pipe ends the command quietly, exit 0."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = f"{sys.executable} -m lntune inspect {small_export} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, capture_output=True, text=True)
    assert done.stdout.startswith("llvm library")
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
