"""LayerNorm forward, forward statistics and backward as TE compute definitions.

Every kernel takes a symbolic row count M (int64, so index arithmetic is safe past 2**31 elements)
and a fixed hidden size N. x, dy, gamma, beta, y and dx carry the user's dtype; mean, rstd and every
accumulation are float32. The backward is one pass over x and dy: a kernel that writes dx and fp32
partial sums of dgamma/dbeta per chunk of rows ([P, N] buffers), and a small kernel that adds the P
partials up, so the column reduction spreads over the whole GPU without atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

ACC = "float32"
DTYPES = ("float32", "float16", "bfloat16")
OPS = ("forward", "forward_stats", "backward", "backward_sum")
# Backward chunks hold a multiple of this many rows, so a schedule can step through them that many
# at a time without a remainder (schedules.spaces.ROWS_PER_STEP). A backward may instead round its
# chunks to single rows (Kernel.granule 1): one row a step only, but no block gets a row more than
# it must (M = 4096 over 66 chunks: 63 rows at most, not 64).
ROW_GRANULE = 2
GRANULES = (ROW_GRANULE, 1)
# Stages of the backward that a schedule keeps in registers or inlines: per element, and "crow",
# the row's (c1/N, c2/N) as one two-element row. As two one-element stages (fourth session), TVM
# 0.27 wrote them into the allreduce's shared result in place from every thread: a race. Likely
# its storage rewrite, which reuses a buffer in place only at equal size; the two-element row is
# stored apart, and a test checks that only thread 0 writes the shared result.
BACKWARD_STAGES = ("xhat", "dyg", "dyf", "gammaf", "crow")


def _rows(rows: int | None) -> tirx.PrimExpr:
    return tirx.Var("M", "int64") if rows is None else tirx.IntImm("int64", rows)


def _dim(extent: int) -> tirx.IntImm:
    """Extents in int64 like M, so every index expression has one integer type."""
    return tirx.IntImm("int64", extent)


def _f32(value: tirx.PrimExpr) -> tirx.PrimExpr:
    return value if value.dtype == ACC else value.astype(ACC)


def _row_moments(x: te.Tensor, n: int) -> tuple[te.Tensor, te.Tensor]:
    """Row sums of x and of (x - mean)**2: two passes, so 1e4 +- 1 data keeps its variance."""
    rows = x.shape[0]
    k1 = te.reduce_axis((0, _dim(n)), "k1")
    x_sum = te.compute((rows,), lambda i: te.sum(_f32(x[i, k1]), axis=k1), name="x_sum")
    k2 = te.reduce_axis((0, _dim(n)), "k2")

    def centred_square(i, k):
        d = _f32(x[i, k]) - x_sum[i] * (1.0 / n)
        return d * d

    x_sq = te.compute((rows,), lambda i: te.sum(centred_square(i, k2), axis=k2), name="x_sq")
    return x_sum, x_sq


def _mean_rstd(x_sum: te.Tensor, x_sq: te.Tensor, n: int, eps: tirx.Var):
    rows = x_sum.shape[0]
    mean = te.compute((rows,), lambda i: x_sum[i] * (1.0 / n), name="mean")
    rstd = te.compute((rows,), lambda i: tirx.rsqrt(x_sq[i] * (1.0 / n) + eps), name="rstd")
    return mean, rstd


def forward_stats(n: int, dtype: str, rows: int | None = None):
    """mean, rstd of each row of x[M, N]; eps is a runtime float32 argument."""
    x = te.placeholder((_rows(rows), _dim(n)), dtype, "x")
    eps = tirx.Var("eps", ACC)
    x_sum, x_sq = _row_moments(x, n)
    mean, rstd = _mean_rstd(x_sum, x_sq, n, eps)
    return [x, eps, mean, rstd]


def forward(n: int, dtype: str, rows: int | None = None):
    """y = (x - mean) * rstd * gamma + beta, plus mean and rstd."""
    x = te.placeholder((_rows(rows), _dim(n)), dtype, "x")
    gamma = te.placeholder((_dim(n),), dtype, "gamma")
    beta = te.placeholder((_dim(n),), dtype, "beta")
    eps = tirx.Var("eps", ACC)
    x_sum, x_sq = _row_moments(x, n)
    mean, rstd = _mean_rstd(x_sum, x_sq, n, eps)

    def normalized(i, j):
        # From the row sums rather than mean/rstd: those are outputs in global memory, these stay on chip.
        r = tirx.rsqrt(x_sq[i] * (1.0 / n) + eps)
        xhat = (_f32(x[i, j]) - x_sum[i] * (1.0 / n)) * r
        return (xhat * _f32(gamma[j]) + _f32(beta[j])).astype(dtype)

    y = te.compute(x.shape, normalized, name="y")
    return [x, gamma, beta, eps, y, mean, rstd]


_SUM_PAIR = te.comm_reducer(
    lambda a, b: (a[0] + b[0], a[1] + b[1]),
    lambda t0, t1: (tirx.const(0.0, t0), tirx.const(0.0, t1)),
    name="sum_pair",
)


def backward(n: int, dtype: str, parts: int, rows: int | None = None, granule: int = ROW_GRANULE):
    """dx and fp32 partial dgamma/dbeta over `parts` contiguous chunks of rows, in one pass.

    Chunk p covers rows p*R .. p*R+R-1 with R = ceil(M / parts) rounded up to a multiple of
    `granule` rows; rows past M add zero. The mask sits
    inside the summand because te.create_prim_func drops te.sum(where=...).
    """
    rows = _rows(rows)
    dy = te.placeholder((rows, _dim(n)), dtype, "dy")
    x = te.placeholder((rows, _dim(n)), dtype, "x")
    mean = te.placeholder((rows,), ACC, "mean")
    rstd = te.placeholder((rows,), ACC, "rstd")
    gamma = te.placeholder((_dim(n),), dtype, "gamma")

    # xhat, float dy and dy*gamma as stages: a schedule computes them once per element into registers
    # (the pair reduction, dx and the partials all use them) or inlines them into every use.
    xhat_t = te.compute((rows, _dim(n)), lambda i, j: (_f32(x[i, j]) - mean[i]) * rstd[i], name="xhat")
    dyf_t = te.compute((rows, _dim(n)), lambda i, j: _f32(dy[i, j]), name="dyf")
    gammaf = te.compute((_dim(n),), lambda j: _f32(gamma[j]), name="gammaf")
    dyg_t = te.compute((rows, _dim(n)), lambda i, j: dyf_t[i, j] * gammaf[j], name="dyg")

    # c1 and c2 as one reduction of a pair: one cross-thread allreduce (one set of barriers) per row.
    k = te.reduce_axis((0, _dim(n)), "k")
    c1, c2 = te.compute((rows,), lambda i: _SUM_PAIR((dyg_t[i, k] * xhat_t[i, k], dyg_t[i, k]), axis=k), name="c")

    # Inlined and simplified, crow[i, 0] is c1[i] * (1 / N) again (schedules.database.workload).
    crow = te.compute((rows, _dim(2)), lambda i, t: tirx.if_then_else(t == 0, c1[i], c2[i]) * (1.0 / n), name="crow")

    def grad_x(i, j):
        inner = dyg_t[i, j] - xhat_t[i, j] * crow[i, 0] - crow[i, 1]
        return (rstd[i] * inner).astype(dtype)

    dx = te.compute((rows, _dim(n)), grad_x, name="dx")

    chunk = (rows + granule * parts - 1) // (granule * parts) * granule
    r1 = te.reduce_axis((0, chunk), "r1")
    r2 = te.reduce_axis((0, chunk), "r2")

    def masked(p, r, value):
        row = p * chunk + r
        return tirx.if_then_else(row < rows, value(row), tirx.const(0.0, ACC))

    dgamma_part = te.compute(
        (_dim(parts), _dim(n)),
        lambda p, j: te.sum(masked(p, r1, lambda i: dyf_t[i, j] * xhat_t[i, j]), axis=r1),
        name="dgamma_part",
    )
    dbeta_part = te.compute(
        (_dim(parts), _dim(n)), lambda p, j: te.sum(masked(p, r2, lambda i: dyf_t[i, j]), axis=r2), name="dbeta_part"
    )
    return [dy, x, mean, rstd, gamma, dx, dgamma_part, dbeta_part]


def backward_sum(n: int, dtype: str, parts: int, rows: int | None = None):
    """dgamma, dbeta (gamma's dtype) from the [parts, N] fp32 partials, summed in a fixed order."""
    dgamma_part = te.placeholder((_dim(parts), _dim(n)), ACC, "dgamma_part")
    dbeta_part = te.placeholder((_dim(parts), _dim(n)), ACC, "dbeta_part")
    p1 = te.reduce_axis((0, _dim(parts)), "p1")
    p2 = te.reduce_axis((0, _dim(parts)), "p2")
    dgamma_acc = te.compute((_dim(n),), lambda j: te.sum(dgamma_part[p1, j], axis=p1), name="dgamma_acc")
    dbeta_acc = te.compute((_dim(n),), lambda j: te.sum(dbeta_part[p2, j], axis=p2), name="dbeta_acc")
    dgamma = te.compute((_dim(n),), lambda j: dgamma_acc[j].astype(dtype), name="dgamma")
    dbeta = te.compute((_dim(n),), lambda j: dbeta_acc[j].astype(dtype), name="dbeta")
    return [dgamma_part, dbeta_part, dgamma, dbeta]


_BUILDERS = {"forward": forward, "forward_stats": forward_stats, "backward": backward, "backward_sum": backward_sum}


@dataclass(frozen=True)
class Kernel:
    """One compiled function: which op, for which hidden size and dtype (and partial count P, and
    for the backward the rows its chunks are rounded to)."""

    op: str
    hidden: int
    dtype: str
    parts: int = 0
    granule: int = ROW_GRANULE

    def __post_init__(self) -> None:
        if self.op not in _BUILDERS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.op.startswith("backward") and self.parts < 1:
            raise ValueError(f"{self.op} needs parts >= 1, got {self.parts}")
        if self.granule != ROW_GRANULE and (self.op != "backward" or self.granule not in GRANULES):
            raise ValueError(f"granule must be one of {GRANULES} and only a backward's, got {self.granule} ({self.op})")

    @property
    def name(self) -> str:
        suffix = f"_p{self.parts}" if self.op.startswith("backward") else ""
        suffix += f"g{self.granule}" if self.granule != ROW_GRANULE else ""
        return f"lntune_{self.op}_{self.dtype}_n{self.hidden}{suffix}"

    def tensors(self, rows: int | None = None):
        """TE tensors of the kernel's arguments; `rows` fixes M, None keeps it symbolic."""
        shape = (self.hidden, self.dtype, self.parts) if self.op.startswith("backward") else (self.hidden, self.dtype)
        chunking = {"granule": self.granule} if self.op == "backward" else {}
        return _BUILDERS[self.op](*shape, rows=rows, **chunking)

    def prim_func(self, rows: int | None = None, eps: float | None = None) -> tirx.PrimFunc:
        """The unscheduled PrimFunc; export builds it with symbolic M and a runtime eps.

        Tuning measures it with M fixed to `rows` and eps bound to a constant (MetaSchedule's runner
        passes tensors only); the schedule is the same either way.
        """
        func = te.create_prim_func(self.tensors(rows)).with_attr("global_symbol", self.name)
        scalars = [p for p in func.params if p.name == "eps"]
        if eps is not None and scalars:
            func = func.specialize({scalars[0]: tirx.FloatImm(ACC, eps)})
        return func
