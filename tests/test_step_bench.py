"""`lntune bench --step` on the CPU: the files it writes, its reference check, its argument checks."""

import csv
import math

import pytest

torch = pytest.importorskip("torch")

import lntune.torch as lntune_torch  # noqa: E402
from lntune import step_bench  # noqa: E402

FAST = ["torch", "liger", "lntune"]  # the compiled implementations take ~10 s each to compile on a CPU


def _run(library, out, **kwargs):
    options = {"steps": 2, "host_steps": 3, "implementations": FAST, "log": lambda *_: None} | kwargs
    return step_bench.run(str(library.directory), [(8, 128)], ["fp32"], out, **options)


def _csv_rows(md_path):
    with md_path.with_suffix(".csv").open() as f:
        return [r for r in csv.DictReader(f) if r["impl"] != "copy"]


def test_run_writes_a_checked_and_timed_row_per_implementation(llvm_library, tmp_path):
    md = _run(llvm_library, tmp_path / "out", tag="t")
    assert md.exists() and md.name.startswith("step-") and md.name.endswith("-t.md")
    rows = {r["impl"]: r for r in _csv_rows(md)}
    assert set(rows) == set(FAST)
    for name in ("torch", "lntune"):
        row = rows[name]
        assert row["config"] == "fp32" and (row["rows"], row["hidden"]) == ("8", "128") and not row["missing"]
        for field in ("step_us", "host_us", "gbps", "fraction_of_copy"):
            assert math.isfinite(float(row[field])) and float(row[field]) > 0, (name, field, row[field])
        for output in ("y", "dx", "dweight", "dbias"):  # checked against float64, and not trivially zero
            assert 0 < float(row[f"err_{output}"]) < 2 * 3e-5, (name, output)
    assert float(rows["torch"]["vs_torch"]) == 1.0
    speedup = float(rows["torch"]["step_us"]) / float(rows["lntune"]["step_us"])
    assert float(rows["lntune"]["over_best_peer"]) == pytest.approx(speedup, rel=0.02)
    if not torch.cuda.is_available():
        assert "CUDA" in rows["liger"]["missing"] and rows["liger"]["step_us"] == ""
    text = md.read_text()
    assert "through the public API" in text and "## fp32" in text
    assert "| M×N | torch | liger | lntune | lntune over best peer |" in text
    assert "| 8×128 | " in text and f"torch {torch.__version__}" in text


def test_a_wrong_lntune_raises_and_is_not_timed(llvm_library, tmp_path, monkeypatch):
    right = lntune_torch.LayerNorm.forward
    monkeypatch.setattr(lntune_torch.LayerNorm, "forward", lambda self, x: right(self, x) * 1.01)
    with pytest.raises(step_bench.WrongResult, match="lntune fp32 8x128"):
        _run(llvm_library, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.csv"))


def test_a_wrong_peer_is_a_missing_cell_with_its_errors(llvm_library, tmp_path, monkeypatch):
    right = torch.nn.LayerNorm.forward
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", lambda self, x: right(self, x) + 0.01)
    rows = {r["impl"]: r for r in _csv_rows(_run(llvm_library, tmp_path / "out"))}
    assert rows["torch"]["missing"].startswith("wrong result: y ") and rows["torch"]["step_us"] == ""
    assert float(rows["lntune"]["step_us"]) > 0 and rows["lntune"]["vs_torch"] == ""


@pytest.mark.parametrize(
    "argument, value",
    [
        ("shapes", [(0, 128)]),
        ("shapes", [(8,)]),
        ("configs", ["fp64"]),
        ("configs", "fp32"),
        ("steps", 0),
        ("host_steps", 1.5),
        ("implementations", ["torch", "cudnn"]),
        ("implementations", ["lntune"]),
        ("tag", "a/b"),
    ],
)
def test_bad_arguments_name_themselves_and_write_nothing(tmp_path, argument, value):
    arguments = {"library": None, "shapes": [(8, 128)], "configs": ["fp32"], "out": tmp_path / "out"}
    arguments[argument] = value
    with pytest.raises(ValueError, match=argument):
        step_bench.run(**arguments)
    assert not (tmp_path / "out").exists()


def test_rounds_go_in_turn_and_each_step_keeps_its_least(monkeypatch):
    """A slow spell spoils one round of one implementation, not its result."""
    calls = []
    spells = {("a", 0): 9.0, ("b", 1): 7.0}

    def measure(fn):
        name = fn()
        round_ = calls.count(name)
        calls.append(name)
        return spells.get((name, round_), 1.0 + 0.1 * round_)

    best = step_bench.least_of_rounds(measure, {"a": lambda: "a", "b": lambda: "b"})
    assert best == {"a": 1.1, "b": 1.0}
    assert calls == ["a", "b"] * step_bench.ROUNDS


def test_cell_rows_count_bytes_ratios_and_which_side_set_the_pace():
    """bytes = 5·M·N·itemsize + 5·N·param itemsize + 16·M; ratios against torch and the fastest peer; the
    host time is marked bounded only where the device step is about as slow as the host or slower."""
    meta = {"device": "stand-in", "date": "2026-12-05", "torch": "x", "device_kind": "cuda"}
    errors = dict.fromkeys(("y", "dx", "dweight", "dbias"), 1e-3)
    timed = {
        "torch": {"step": 0.4, "host": 0.2, "unqueued": False, "errors": errors},  # device-bound
        "liger": {"step": 0.2, "host": 0.8, "unqueued": False, "errors": errors},  # host-bound
        "lntune": {"step": 0.1, "host": 0.9, "unqueued": True, "errors": errors},
    }
    names = ["torch", "torch-compile", "liger", "lntune"]
    missing = {"torch-compile": "RuntimeError: stand-in"}
    rows = step_bench._cell_rows(meta, "bf16-fp32params", 1024, 256, names, timed, missing, 1000.0, 50 * 2**20)
    got = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows] == names
    assert all(r["bytes"] == 5 * 1024 * 256 * 2 + 5 * 256 * 4 + 16 * 1024 for r in rows)
    assert got["torch"]["host_bounded"] and not got["liger"]["host_bounded"] and not got["lntune"]["host_bounded"]
    assert got["lntune"]["vs_torch"] == 4.0 and got["lntune"]["over_best_peer"] == 2.0
    assert got["lntune"]["step_unqueued"] and got["lntune"]["fraction_of_copy"] == pytest.approx(
        rows[0]["bytes"] / 0.1 / 1e6 / 1000.0, rel=1e-3
    )
    assert got["torch-compile"]["missing"] == "RuntimeError: stand-in" and "step_us" not in got["torch-compile"]
    assert "over_best_peer" not in got["liger"]
