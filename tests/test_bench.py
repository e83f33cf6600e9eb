"""`lntune bench`'s CPU-side parts: the API peer's callables and the markdown table (timing needs a GPU)."""

import pytest

from lntune import bench

torch = pytest.importorskip("torch")


def test_api_peer_runs_the_public_calls_and_passes_the_reference_check(llvm_library):
    """The "lntune-api" passes call lib.forward/backward on torch tensors and give results that the
    bench's own reference check accepts; a wrong output fails that check."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 128, generator=gen) + 3
    gamma, beta, dy = torch.randn(128, generator=gen), torch.randn(128, generator=gen), torch.randn_like(x)
    impls = bench.Impls.__new__(bench.Impls)
    impls.lib, impls.x, impls.gamma, impls.beta, impls.dy, impls.passes = llvm_library, x, gamma, beta, dy, {}
    _, impls.mean, impls.rstd = llvm_library.forward(x, gamma, beta)
    impls._api()
    ref = bench._reference(torch, impls)
    for pass_ in ("forward", "backward"):
        outputs = impls.passes[("lntune-api", pass_)]()
        assert bench._errors("lntune-api", pass_, outputs, ref) < 1e-5
    broken = list(impls.passes[("lntune-api", "backward")]())
    broken[1] = broken[1] * 1.01
    assert bench._errors("lntune-api", "backward", broken, ref) > 1e-3


def test_markdown_gives_each_peer_its_ratio_to_the_bare_kernels(tmp_path):
    meta = {"device": "stand-in", "date": "2026-11-26"}
    rows = [
        {
            **meta,
            "impl": impl,
            "pass": "backward",
            "dtype": "float32",
            "hidden": 1024,
            "rows": 8,
            "ms": ms,
            "fraction_of_copy": frac,
        }
        for impl, ms, frac in (("lntune", 0.1, 0.9), ("lntune-api", 0.125, 0.72), ("aten", 0.2, 0.45))
    ]
    bench.write_markdown(rows, 3000.0, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "| dtype | N | M | lntune | lntune-api | aten |" in text
    assert "| float32 | 1024 | 8 | 0.9 | 0.72 (1.25×) | 0.45 (2.00×) |" in text


def test_each_pass_keeps_its_least_round_and_rounds_go_in_turn(monkeypatch):
    """A slow spell spoils one round of a pass, not its time; rounds alternate over the passes."""
    calls = []
    spells = {("a", 0): 9.0, ("b", 1): 7.0}  # pass a slow in round 0, b in round 1

    def fake_time(fn, _torch):
        name = fn()
        round_ = sum(1 for c in calls if c == name)
        calls.append(name)
        return spells.get((name, round_), 1.0 + 0.1 * round_)

    monkeypatch.setattr(bench, "_time", fake_time)
    best = bench._least_of_rounds({"a": lambda: "a", "b": lambda: "b"}, torch)
    assert best == {"a": 1.1, "b": 1.0}
    assert calls == ["a", "b"] * bench.ROUNDS
