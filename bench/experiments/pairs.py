"""Backward + partials-sum pairs of several builds on shared buffers, for the experiments that
compare builds of the same kernels (dependent_launch.py, private_copies.py). CUDA, torch tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

# name -> (backward, sum, P) of one build
Builds = dict[str, tuple[Callable, Callable, int]]


def inputs(rows: int, hidden: int, dtype: str) -> list[torch.Tensor]:
    """A backward's inputs (dy, x, mean, rstd, gamma): fresh, non-zero random data."""
    dt = getattr(torch, dtype)
    x = torch.randn(rows, hidden, device="cuda", dtype=dt) + 3
    dy = torch.randn(rows, hidden, device="cuda", dtype=dt)
    mean = torch.randn(rows, device="cuda")
    rstd = torch.rand(rows, device="cuda") + 0.5
    gamma = torch.randn(hidden, device="cuda", dtype=dt)
    return [dy, x, mean, rstd, gamma]


class Pairs:
    """Two input sets of `rows` x `hidden` and one set of outputs that every build writes."""

    def __init__(self, builds: Builds, rows: int, hidden: int, dtype: str) -> None:
        self.builds, self.hidden, self.dtype = builds, hidden, dtype
        parts = next(iter(builds.values()))[2]
        self.sets = [inputs(rows, hidden, dtype) for _ in range(2)]
        self.dx = torch.empty_like(self.sets[0][0])
        self.partials = [torch.empty(parts, hidden, device="cuda") for _ in range(2)]
        self.dgamma, self.dbeta = (torch.empty(hidden, device="cuda", dtype=getattr(torch, dtype)) for _ in range(2))

    @property
    def outputs(self) -> tuple[torch.Tensor, ...]:
        return self.dx, self.dgamma, self.dbeta

    def backward(self, build: str, args: list[torch.Tensor]) -> None:
        self.builds[build][0](*args, self.dx, *self.partials)

    def sum(self, build: str) -> None:
        self.builds[build][1](*self.partials, self.dgamma, self.dbeta)

    def run(self, build: str, args: list[torch.Tensor]) -> None:
        self.backward(build, args)
        self.sum(build)

    def expect_equal(self, reference: str, others: list[str], rounds: int = 10) -> None:
        """Each of `others` must write what `reference` does, bit for bit, on both input sets used
        in turn `rounds` times, every output and partial poisoned first (a sum that read partials
        before its backward wrote them would see the other set's)."""
        expected = []
        for args in self.sets:
            self.run(reference, args)
            expected.append([t.clone() for t in self.outputs])
        for build in others:
            for _ in range(rounds):
                for args, want in zip(self.sets, expected, strict=True):
                    for t in (*self.outputs, *self.partials):
                        t.fill_(float("nan"))
                    self.run(build, args)
                    if not all(torch.equal(g, w) for g, w in zip(self.outputs, want, strict=True)):
                        case = f"N={self.hidden} {self.dtype}"
                        raise SystemExit(f"{case}: the {build} pair's outputs differ from the {reference} pair's")


def run_cases(case: Callable, cases: list[tuple[int, str]], line: Callable[[dict], str], out: str) -> None:
    """`case(target, hidden, dtype)` for each of `cases` on torch's stream (None: left out), a
    printed `line` of each result, and all of them as JSON in `out`."""
    import json
    from pathlib import Path

    import tvm_ffi

    from schedules.targets import get_target

    target = get_target("cuda-sm90")
    results = {"device": torch.cuda.get_device_name(), "cases": {}}
    with tvm_ffi.use_torch_stream():
        for hidden, dtype in cases:
            result = case(target, hidden, dtype)
            if result is not None:
                results["cases"][f"{dtype} N={hidden}"] = result
                print(f"{dtype:<9} N={hidden:<6} {line(result['us'])}", flush=True)
    Path(out).write_text(json.dumps(results, indent=1))
