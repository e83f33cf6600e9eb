"""The knobs of each GPU kernel family as typed, frozen values: the field names are the knob names
that tuning records, selection.json and manifests use, and `to_dict` gives the dict those hold (in
the same key order). The schedule functions still pick each knob through schedules.knobs (Sampled,
Fixed), so one function serves a design space and fixed values alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class _KnobSet:
    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, knobs: Mapping[str, int]):
        """The knob set of `knobs`, which must name exactly this family's knobs."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(knobs) != names:
            raise ValueError(f"{cls.__name__} takes {sorted(names)}, got {sorted(knobs)}")
        return cls(**knobs)


@dataclasses.dataclass(frozen=True)
class RowwiseKnobs(_KnobSet):
    """forward and forward_stats (schedules.rowwise)."""

    threads: int
    rows_per_block: int
    unroll: int


@dataclasses.dataclass(frozen=True)
class BackwardKnobs(_KnobSet):
    """The one-pass backward (schedules.backward; its docstring says what each knob does)."""

    cache_rows: int
    cache_gamma: int
    chunked: int
    rows_per_step: int
    explicit_unroll: int
    shared_acc: int
    threads_per_sm: int
    stage_rows: int
    row_scalars: int
    prefetch: int
    private_copies: int
    cluster: int
    threads: int
    unroll: int


@dataclasses.dataclass(frozen=True)
class SumKnobs(_KnobSet):
    """The partials sum (schedules.partials_sum): columns a block (`threads`) and lanes over P."""

    threads: int
    lanes: int
    unroll: int


GPU_KNOB_SETS = {
    "forward": RowwiseKnobs,
    "forward_stats": RowwiseKnobs,
    "backward": BackwardKnobs,
    "backward_sum": SumKnobs,
}
