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
