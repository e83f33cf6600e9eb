"""LayerNorm forward, forward statistics and backward as TE compute definitions.

Every kernel takes a symbolic row count M (int64, so index arithmetic is safe past 2**31 elements)
and a fixed hidden size N. x, dy, y and dx carry the user's dtype; gamma, beta, dgamma and dbeta
carry the parameters' dtype (the same, or float32 beside 16-bit activations: mixed precision, as
AMP and FSDP master weights train); mean, rstd and every accumulation are float32. The backward
is one pass over x and dy: a kernel that writes dx and fp32 partial sums of dgamma/dbeta per chunk
of rows ([P, N] buffers), and a small kernel that adds the P partials up, so the column reduction
spreads over the whole GPU without atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

ACC = "float32"
DTYPES = ("float32", "float16", "bfloat16")
# Parameter dtypes besides the activations' own: float32 gamma/beta beside 16-bit x, dy.
MIXED_PARAMS = {"float16": ("float32",), "bfloat16": ("float32",)}
DTYPE_SPECS = DTYPES + tuple(f"{d}:{p}" for d, params in MIXED_PARAMS.items() for p in params)
OPS = ("forward", "forward_stats", "backward", "backward_sum")
# Backward chunks hold a multiple of this many rows, so a schedule can step through them that many
# at a time without a remainder (schedules.backward.ROWS_PER_STEP). A backward may instead round its
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


# Two sums in one reduction: one cross-thread allreduce (one set of barriers) for both.
_SUM_PAIR = te.comm_reducer(
    lambda a, b: (a[0] + b[0], a[1] + b[1]),
    lambda t0, t1: (tirx.const(0.0, t0), tirx.const(0.0, t1)),
    name="sum_pair",
)


# Below this N, 1/N is multiplied in: TVM's CUDA code prints a float64 constant with 15 decimals,
# which leaves 1/N off by up to 5e-16 * N relative, under a quarter of float32's half unit in the
# last place (2**-26) up to here. From here on a division (exact, but its latency shows).
OVER_N_PRODUCT_LIMIT = 1 << 24


def _over_n(value: tirx.PrimExpr, n: int) -> tirx.PrimExpr:
    """value / n rounded to float32 once, through float64: exactly d where value = n * d.

    In float64, value times 1/n is far closer to value / n than float32 resolves (see
    OVER_N_PRODUCT_LIMIT), so the float32 result is value / n correctly rounded (short of a
    double-rounding tie) whatever the compilers do with float32 arithmetic: TVM builds CUDA with
    --use_fast_math (approximate float32 division, flush to zero), and a float32 multiply by a
    rounded 1/N is off by up to an ulp. A float64 division instead was as exact but cost the
    forward 3-7 % at N = 5120 on the H100 (its latency sits between a row's sums and its y).
    """
    wide = value.astype("float64")
    if n < OVER_N_PRODUCT_LIMIT:
        return (wide * tirx.const(1.0 / n, "float64")).astype(ACC)
    return (wide / tirx.const(float(n), "float64")).astype(ACC)


# The row's terms (stage "x_terms"): the shift a = sum(x) / N, sum(d) / N and sum(d**2) / N, with d =
# x - a. Three elements a row, computed once and kept in registers by a schedule: inlined, every
# element of y re-read the allreduces' volatile shared results and divided again. (Not one-element
# stages: see BACKWARD_STAGES for the race TVM made of those.)
ROW_TERMS = ("shift", "delta", "square")


@dataclass(frozen=True)
class _Moments:
    """x widened and each row's mean and rstd from its x_terms row (see _row_moments)."""

    xf: te.Tensor
    terms: te.Tensor

    def mean(self, i) -> tirx.PrimExpr:
        return self.terms[i, 0] + self.terms[i, 1]

    def rstd(self, i, eps: tirx.Var) -> tirx.PrimExpr:
        delta = self.terms[i, 1]
        return tirx.rsqrt(tirx.max(self.terms[i, 2] - delta * delta, tirx.const(0.0, ACC)) + eps)


def _row_moments(x: te.Tensor, n: int) -> _Moments:
    """Pass one sums x (a = sum / N, about the mean); pass two sums d = x - a and d**2 as one pair.

    mean = a + sum(d) / N and var = sum(d**2) / N - (sum(d) / N)**2 (at least 0). For a row of one
    value c, d = c - a is exact and a few units in the last place of c, so sum(d) = N * d exactly,
    sum(d) / N = d exactly (_over_n) and mean = a + d = c: x - mean is 0 and y is beta, where a
    rounded mean (the sum times a rounded 1/N) left x - mean a unit in the last place of c, times
    rstd = 1/sqrt(eps) = 1e6 at BERT's eps. Rows far from zero (1e4 +- 1) keep their variance: d is
    small, so its square loses nothing to the offset. Both passes read x from registers (the
    schedule caches the row), and the pair is one allreduce, as the second pass was before.
    """
    rows = x.shape[0]
    # x widened: a schedule inlines it (the row cached as x) or keeps the row so (bfloat16 where it
    # is emulated: schedules.layout.legalized_bf16).
    xf = te.compute(x.shape, lambda i, j: _f32(x[i, j]), name="x_f32")
    k1 = te.reduce_axis((0, _dim(n)), "k1")
    x_sum = te.compute((rows,), lambda i: te.sum(xf[i, k1], axis=k1), name="x_sum")
    k2 = te.reduce_axis((0, _dim(n)), "k2")

    # a, only a shift that brings the row near zero (so it may be off), once a row into registers (a
    # schedule keeps the stage there): read from x_sum, the allreduce's volatile shared result, it
    # cost the pair a shared load and a multiply three times an element. Two copies, one for the
    # pair and one for x_terms: TVM 0.27 rewrites a one-element stage (or one compacted to one
    # element) in place into that shared result from every thread, a race (see BACKWARD_STAGES).
    x_shift = te.compute((rows, _dim(2)), lambda i, t: x_sum[i] * (1.0 / n), name="x_shift")

    def deviation(i, k):
        d = xf[i, k] - x_shift[i, 0]
        return d, d * d

    d_sum, d_sq = te.compute((rows,), lambda i: _SUM_PAIR(deviation(i, k2), axis=k2), name="x_dev")

    def term(i, t):
        scaled = tirx.if_then_else(t == 1, _over_n(d_sum[i], n), _over_n(d_sq[i], n))
        return tirx.if_then_else(t == 0, x_shift[i, 1], scaled)

    return _Moments(xf, te.compute((rows, _dim(len(ROW_TERMS))), term, name="x_terms"))


def _statistics(moments: _Moments, eps: tirx.Var) -> tuple[te.Tensor, te.Tensor]:
    rows = moments.terms.shape[0]
    mean = te.compute((rows,), moments.mean, name="mean")
    rstd = te.compute((rows,), lambda i: moments.rstd(i, eps), name="rstd")
    return mean, rstd


def forward_stats(n: int, dtype: str, rows: int | None = None, legacy: bool = False):
    """mean, rstd of each row of x[M, N]; eps is a runtime float32 argument."""
    if legacy:
        return _legacy_forward_stats(n, dtype, rows)
    x = te.placeholder((_rows(rows), _dim(n)), dtype, "x")
    eps = tirx.Var("eps", ACC)
    mean, rstd = _statistics(_row_moments(x, n), eps)
    return [x, eps, mean, rstd]


def forward(n: int, dtype: str, rows: int | None = None, param_dtype: str | None = None, legacy: bool = False):
    """y = (x - mean) * rstd * gamma + beta, plus mean and rstd; gamma and beta in `param_dtype`."""
    if legacy:
        return _legacy_forward(n, dtype, rows)
    x = te.placeholder((_rows(rows), _dim(n)), dtype, "x")
    gamma = te.placeholder((_dim(n),), param_dtype or dtype, "gamma")
    beta = te.placeholder((_dim(n),), param_dtype or dtype, "beta")
    eps = tirx.Var("eps", ACC)
    moments = _row_moments(x, n)
    mean, rstd = _statistics(moments, eps)

    def normalized(i, j):
        # From the row's terms on chip rather than the mean/rstd outputs in global memory. x - mean,
        # not (x - a) - sum(d) / N: mean is c itself for a row of one value c, so y is exactly beta
        # even where sum(d) / N were rounded.
        xhat = (moments.xf[i, j] - moments.mean(i)) * moments.rstd(i, eps)
        return (xhat * _f32(gamma[j]) + _f32(beta[j])).astype(dtype)

    y = te.compute(x.shape, normalized, name="y")
    return [x, gamma, beta, eps, y, mean, rstd]


# The statistics as they were before the exact ones above: the mean as the sum times 1/N, then the
# sum of squares about it. Kept only to rebuild the tuning workloads of the forward records tuned
# with them, so those records are still found (schedules.database.workload_hashes); never exported.
def _legacy_row_moments(x: te.Tensor, n: int) -> tuple[te.Tensor, te.Tensor]:
    rows = x.shape[0]
    k1 = te.reduce_axis((0, _dim(n)), "k1")
    x_sum = te.compute((rows,), lambda i: te.sum(_f32(x[i, k1]), axis=k1), name="x_sum")
    k2 = te.reduce_axis((0, _dim(n)), "k2")

    def centred_square(i, k):
        d = _f32(x[i, k]) - x_sum[i] * (1.0 / n)
        return d * d

    x_sq = te.compute((rows,), lambda i: te.sum(centred_square(i, k2), axis=k2), name="x_sq")
    return x_sum, x_sq


def _legacy_mean_rstd(x_sum: te.Tensor, x_sq: te.Tensor, n: int, eps: tirx.Var):
    rows = x_sum.shape[0]
    mean = te.compute((rows,), lambda i: x_sum[i] * (1.0 / n), name="mean")
    rstd = te.compute((rows,), lambda i: tirx.rsqrt(x_sq[i] * (1.0 / n) + eps), name="rstd")
    return mean, rstd


def _legacy_forward_stats(n: int, dtype: str, rows: int | None = None):
    x = te.placeholder((_rows(rows), _dim(n)), dtype, "x")
    eps = tirx.Var("eps", ACC)
    x_sum, x_sq = _legacy_row_moments(x, n)
    mean, rstd = _legacy_mean_rstd(x_sum, x_sq, n, eps)
    return [x, eps, mean, rstd]


def _legacy_forward(n: int, dtype: str, rows: int | None = None):
    x = te.placeholder((_rows(rows), _dim(n)), dtype, "x")
    gamma = te.placeholder((_dim(n),), dtype, "gamma")
    beta = te.placeholder((_dim(n),), dtype, "beta")
    eps = tirx.Var("eps", ACC)
    x_sum, x_sq = _legacy_row_moments(x, n)
    mean, rstd = _legacy_mean_rstd(x_sum, x_sq, n, eps)

    def normalized(i, j):
        r = tirx.rsqrt(x_sq[i] * (1.0 / n) + eps)
        xhat = (_f32(x[i, j]) - x_sum[i] * (1.0 / n)) * r
        return (xhat * _f32(gamma[j]) + _f32(beta[j])).astype(dtype)

    y = te.compute(x.shape, normalized, name="y")
    return [x, gamma, beta, eps, y, mean, rstd]


def backward(
    n: int, dtype: str, parts: int, rows: int | None = None, granule: int = ROW_GRANULE, param_dtype: str | None = None
):
    """dx and fp32 partial dgamma/dbeta over `parts` contiguous chunks of rows, in one pass; gamma
    in `param_dtype` (default `dtype`).

    Chunk p covers rows p*R .. p*R+R-1 with R = ceil(M / parts) rounded up to a multiple of
    `granule` rows; rows past M add zero. The mask sits
    inside the summand because te.create_prim_func drops te.sum(where=...).
    """
    rows = _rows(rows)
    dy = te.placeholder((rows, _dim(n)), dtype, "dy")
    x = te.placeholder((rows, _dim(n)), dtype, "x")
    mean = te.placeholder((rows,), ACC, "mean")
    rstd = te.placeholder((rows,), ACC, "rstd")
    gamma = te.placeholder((_dim(n),), param_dtype or dtype, "gamma")

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


def backward_sum(n: int, dtype: str, parts: int, rows: int | None = None, param_dtype: str | None = None):
    """dgamma, dbeta (gamma's dtype, `param_dtype` or else `dtype`) from the [parts, N] fp32
    partials, summed in a fixed order."""
    param_dtype = param_dtype or dtype
    dgamma_part = te.placeholder((_dim(parts), _dim(n)), ACC, "dgamma_part")
    dbeta_part = te.placeholder((_dim(parts), _dim(n)), ACC, "dbeta_part")
    p1 = te.reduce_axis((0, _dim(parts)), "p1")
    p2 = te.reduce_axis((0, _dim(parts)), "p2")
    dgamma_acc = te.compute((_dim(n),), lambda j: te.sum(dgamma_part[p1, j], axis=p1), name="dgamma_acc")
    dbeta_acc = te.compute((_dim(n),), lambda j: te.sum(dbeta_part[p2, j], axis=p2), name="dbeta_acc")
    dgamma = te.compute((_dim(n),), lambda j: dgamma_acc[j].astype(param_dtype), name="dgamma")
    dbeta = te.compute((_dim(n),), lambda j: dbeta_acc[j].astype(param_dtype), name="dbeta")
    return [dgamma_part, dbeta_part, dgamma, dbeta]


_BUILDERS = {"forward": forward, "forward_stats": forward_stats, "backward": backward, "backward_sum": backward_sum}


def parse_dtype_spec(spec: str) -> tuple[str, str | None]:
    """A dtype spec, "bfloat16" or "bfloat16:float32" (activations:parameters), as (dtype,
    param_dtype); param_dtype is None for one dtype throughout. ValueError names what is allowed."""
    if not isinstance(spec, str) or spec.strip() not in DTYPE_SPECS:
        raise ValueError(
            f"dtype must be one of {DTYPE_SPECS} (activations:parameters for float32 parameters beside 16-bit "
            f"activations), got {spec!r}"
        )
    dtype, _, params = spec.strip().partition(":")
    return dtype, (params if params and params != dtype else None)


def dtype_spec(dtype: str, param_dtype: str | None = None) -> str:
    """The spec string of (dtype, param_dtype): parse_dtype_spec's inverse."""
    return dtype if param_dtype in (None, dtype) else f"{dtype}:{param_dtype}"


@dataclass(frozen=True)
class Kernel:
    """One compiled function: which op, for which hidden size and dtype (and partial count P, and
    for the backward the rows its chunks are rounded to). `param_dtype` is gamma's and beta's (and
    dgamma's and dbeta's) dtype when it is not `dtype`: float32 beside 16-bit activations; None
    (or `dtype`, which means the same and is stored as None) for one dtype throughout."""

    op: str
    hidden: int
    dtype: str
    parts: int = 0
    granule: int = ROW_GRANULE
    param_dtype: str | None = None

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
        if self.param_dtype == self.dtype:
            object.__setattr__(self, "param_dtype", None)  # one dtype throughout: the plain kernel
        if self.param_dtype is not None and self.param_dtype not in MIXED_PARAMS.get(self.dtype, ()):
            raise ValueError(
                f"param_dtype must be None, {self.dtype!r} or one of {MIXED_PARAMS.get(self.dtype, ())} "
                f"beside {self.dtype} activations (mixed: {MIXED_PARAMS}), got {self.param_dtype!r}"
            )
        if self.param_dtype is not None and self.op == "forward_stats":
            raise ValueError("forward_stats has no parameters: param_dtype must be None (its plain kernel serves both)")

    @property
    def params(self) -> str:
        """gamma's and beta's dtype."""
        return self.param_dtype or self.dtype

    @property
    def name(self) -> str:
        suffix = f"_p{self.parts}" if self.op.startswith("backward") else ""
        suffix += f"g{self.granule}" if self.granule != ROW_GRANULE else ""
        dtypes = self.dtype if self.param_dtype is None else f"{self.dtype}_{self.param_dtype}"
        return f"lntune_{self.op}_{dtypes}_n{self.hidden}{suffix}"

    def tensors(self, rows: int | None = None, legacy: bool = False):
        """TE tensors of the kernel's arguments; `rows` fixes M, None keeps it symbolic. `legacy`:
        the forward's statistics as they were before the exact ones (tuning workloads only)."""
        shape = (self.hidden, self.dtype, self.parts) if self.op.startswith("backward") else (self.hidden, self.dtype)
        options = {"granule": self.granule} if self.op == "backward" else {}
        if self.param_dtype is not None:
            options["param_dtype"] = self.param_dtype
        if legacy:
            if not self.has_legacy_workload:
                raise ValueError(f"{self.name} has no legacy form (only plain forward and forward_stats have one)")
            options["legacy"] = True
        return _BUILDERS[self.op](*shape, rows=rows, **options)

    @property
    def has_legacy_workload(self) -> bool:
        """Whether tuning records may hold this kernel's statistics as they were before the exact
        ones (te_ops' _legacy_row_moments)."""
        return self.op in ("forward", "forward_stats") and self.param_dtype is None

    def prim_func(self, rows: int | None = None, eps: float | None = None, legacy: bool = False) -> tirx.PrimFunc:
        """The unscheduled PrimFunc; export builds it with symbolic M and a runtime eps.

        Tuning measures it with M fixed to `rows` and eps bound to a constant (MetaSchedule's runner
        passes tensors only); the schedule is the same either way.
        """
        func = te.create_prim_func(self.tensors(rows, legacy)).with_attr("global_symbol", self.name)
        scalars = [p for p in func.params if p.name == "eps"]
        if eps is not None and scalars:
            func = func.specialize({scalars[0]: tirx.FloatImm(ACC, eps)})
        return func
