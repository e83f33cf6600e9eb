"""Knobs: the sampled decisions of a design space, or the same decisions fixed.

A schedule function asks `knobs.pick(sch, name, candidates)` for each decision. In a design space the
answer is a `sample_categorical` random variable that MetaSchedule samples, mutates and measures; for a
baseline or a tuned record it is a plain int. So a baseline, a tuned record and a transfer between
targets are all the same schedule with different decisions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tvm import s_tir


class Sampled:
    """Decisions left to MetaSchedule: each knob becomes a uniform sample_categorical.

    Structural knobs (which stages exist) cannot be sampled inside one trace, since Python branches on
    them; a design space instead holds one schedule per structure, and each records its structure as
    a one-candidate sample so that a tuned trace still says which structure it is.
    """

    def __init__(self, structure: Mapping[str, int] | None = None) -> None:
        self.structure = dict(structure or {})

    def pick(self, sch: s_tir.Schedule, name: str, candidates: Sequence[int]):
        candidates = [int(c) for c in candidates]
        return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))

    def structural(self, sch: s_tir.Schedule, name: str, candidates: Sequence[int]) -> int:
        value = int(self.structure.get(name, candidates[0]))
        sch.sample_categorical([value], [1.0])
        return value


UNROLL_KEY = "meta_schedule.unroll_explicit"
IMPLICIT_UNROLL_KEY = "meta_schedule.unroll_implicit"


def annotate_unroll(sch: s_tir.Schedule, loop, step, explicit: bool = True) -> None:
    """Auto-unroll below `loop`: a sampled step goes through MetaSchedule's unroll postproc/mutator.

    Explicit: TVM copies the loop bodies itself; implicit: it emits `#pragma unroll` and nvcc does.
    """
    if isinstance(step, int):
        sch.annotate(loop, "pragma_auto_unroll_max_step", step)
        sch.annotate(loop, "pragma_unroll_explicit", int(explicit))
    else:
        sch.annotate(sch.get_sblock("root"), UNROLL_KEY if explicit else IMPLICIT_UNROLL_KEY, step)


class Fixed:
    """Decisions given by name; a knob that is missing or not among the candidates takes the middle
    candidate (a structural knob that is missing, its first)."""

    def __init__(self, values: Mapping[str, int] | None = None) -> None:
        self.values = dict(values or {})
        self.used: dict[str, int] = {}

    def pick(self, sch: s_tir.Schedule, name: str, candidates: Sequence[int]) -> int:
        candidates = [int(c) for c in candidates]
        value = self.values.get(name)
        if value not in candidates:
            value = candidates[len(candidates) // 2]
        self.used[name] = value
        return value

    def structural(self, sch: s_tir.Schedule, name: str, candidates: Sequence[int]) -> int:
        # A missing structural knob takes the first candidate: the structure from before it existed.
        if name not in self.values:
            self.values[name] = int(candidates[0])
        return self.pick(sch, name, candidates)


class Recorder(Fixed):
    """Fixed decisions that also remember the order of the knobs, to read a tuned trace by name."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def pick(self, sch: s_tir.Schedule, name: str, candidates: Sequence[int]) -> int:
        self.order.append(name)
        return super().pick(sch, name, candidates)

    def structural(self, sch: s_tir.Schedule, name: str, candidates: Sequence[int]) -> int:
        return self.pick(sch, name, candidates)


def decisions_of(trace: s_tir.Trace) -> list[int]:
    """The values chosen by each sample_categorical of a trace, in program order."""
    values = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            candidates = inst.attrs[0]
            values.append(int(candidates[int(trace.decisions[inst])]))
    return values
