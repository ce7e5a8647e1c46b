"""Statistics of the reproduction: Student's t distribution, paired t-tests, bands over seeds.

Pure Python (no SciPy in the project's environment). The t CDF is the regularised incomplete
beta function, evaluated by its continued fraction (modified Lentz); the quantile inverts the
CDF by bisection. Tests check both against t-table values and closed forms.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (converges for x < (a+1)/(a+b+2))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (bisection on :func:`t_cdf`, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Paired:
    """A paired comparison over seeds: ``other - base`` per shared seed.

    Attributes:
        n: seeds both arms have.
        mean: mean of the per-seed differences.
        sd: their sample standard deviation (None for n < 2).
        lo, hi: the 95% t-interval of the mean difference (None for n < 2).
        p: two-sided p-value of the paired t-test of "mean difference = 0" (None for n < 2).
    """

    n: int
    mean: float | None
    sd: float | None = None
    lo: float | None = None
    hi: float | None = None
    p: float | None = None

    @property
    def resolved(self) -> bool:
        """True when the 95% interval excludes 0."""
        return self.lo is not None and (self.lo > 0 or self.hi < 0)


def paired_t(diffs: Sequence[float], level: float = 0.95) -> Paired:
    """Paired t-interval and two-sided p-value of the differences' mean."""
    vals = [float(d) for d in diffs]
    n = len(vals)
    if n == 0:
        return Paired(0, None)
    mean = statistics.fmean(vals)
    if n < 2:
        return Paired(1, mean)
    sd = statistics.stdev(vals)
    df = n - 1
    if sd == 0.0:  # every seed gives the same difference: no spread to test against
        return Paired(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, df) * se
    t = mean / se
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    return Paired(n, mean, sd, mean - half, mean + half, min(1.0, max(0.0, p)))


def paired_by_seed(base: Mapping[int, float], other: Mapping[int, float]) -> Paired:
    """:func:`paired_t` of ``other[s] - base[s]`` over the seeds both have."""
    seeds = sorted(s for s in base if s in other and base[s] is not None and other[s] is not None)
    return paired_t([other[s] - base[s] for s in seeds])


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def mean_band(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t-interval (0 for a single value)."""
    mean, sd = mean_std(values)
    if mean is None:
        raise ValueError("no values")
    if sd is None:
        return mean, 0.0
    return mean, t_quantile(0.5 + level / 2.0, len(values) - 1) * sd / math.sqrt(len(values))


def curves_by_step(curves: Mapping[int, Mapping[int, float]]) -> dict[int, dict[int, float]]:
    """Seed -> {step: value} into step -> {seed: value}, keeping the steps every seed has."""
    if not curves:
        return {}
    common = set.intersection(*(set(c) for c in curves.values()))
    return {step: {s: c[step] for s, c in curves.items()} for step in sorted(common)}


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out
