"""Statistics over seeds: a variant's mean with its interval, the difference from a baseline with its test, Holm's
correction over the comparisons, and the power of the design (docs/experiments.md, "Reading the verdicts").

Formulas (n runs of a variant, values x_i; s the sample standard deviation, ddof = 1):

- mean +- t_{0.975, n-1} s / sqrt(n): Student's t interval (``scipy.stats.t``); or ``scipy.stats.bootstrap`` (BCa).
- Paired design (both variants ran the same seeds): d_i = x_i(variant) - x_i(baseline), a paired t test
  (``scipy.stats.ttest_rel``, interval mean(d) +- t s_d / sqrt(n)) or Wilcoxon's signed-rank test on request.
  Otherwise Welch's t test (``scipy.stats.ttest_ind(equal_var=False)``, Welch-Satterthwaite degrees of freedom)
  or the Mann-Whitney U test on request.
- Holm (1979): with m comparisons and p-values sorted p_(1) <= ... <= p_(m), the adjusted p_(i) is
  max_{j <= i} min(1, (m - j + 1) p_(j)); a comparison is decided when its adjusted p < alpha.
- Power of a two-sided t test at level alpha: P(|T| > t_crit) with T noncentral t (``scipy.stats.nct``), df and
  noncentrality delta / SE: paired, SE = s_d / sqrt(n), df = n - 1; unpaired, SE = s sqrt(1/n_a + 1/n_b),
  df = n_a + n_b - 2, s the pooled seed-to-seed standard deviation. The smallest detectable difference solves
  power = 0.8 for delta (``scipy.optimize.brentq``); the seeds needed for a difference are the smallest n with
  power >= 0.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
POWER = 0.8
CONFIDENCE = 0.95
TESTS = ("auto", "t", "wilcoxon")
INTERVALS = ("t", "bootstrap")


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None  # None for n = 1
    low: float | None  # the interval; None for n = 1
    high: float | None


def describe(values, interval: str = "t", confidence: float = CONFIDENCE, seed: int = 0) -> Summary:
    """n, mean, standard deviation and the ``confidence`` interval of the mean of ``values``."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    found = _bootstrap((x,), np.mean, confidence, seed) if interval == "bootstrap" and std > 0 else None
    if found is not None:
        return Summary(n, mean, std, *found)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass
class Difference:
    test: str  # "paired t", "Welch t", "Wilcoxon signed-rank", "Mann-Whitney U"; "" when there is no test
    paired: bool
    n_pairs: int
    diff: float  # mean(variant) - mean(baseline)
    low: float | None
    high: float | None
    p: float | None
    sd: float | None  # the noise the test sees: s_d (paired) or the pooled seed-to-seed s (unpaired)
    note: str = ""


def difference(variant: dict[int, list[float]], baseline: dict[int, list[float]], test: str = "auto",
               interval: str = "t", confidence: float = CONFIDENCE, seed: int = 0) -> Difference:
    """The difference variant - baseline, from their values by seed ({seed: [value]}), with a test.

    Paired on the seeds both ran when they share two or more (the others are left out of the paired test), else
    unpaired over all their values."""
    from scipy import stats

    a = [v for values in variant.values() for v in values]
    b = [v for values in baseline.values() for v in values]
    diff = float(np.mean(a) - np.mean(b))
    shared = sorted(set(variant) & set(baseline))
    once = all(len(variant[s]) == 1 and len(baseline[s]) == 1 for s in shared)
    paired = once and len(shared) >= 2
    if paired:
        seeds = shared
        x = np.array([variant[s][0] for s in seeds])
        y = np.array([baseline[s][0] for s in seeds])
        d = x - y
        diff = float(d.mean())  # over the pairs: the difference the paired test and its interval are about
        sd = float(d.std(ddof=1))
        if sd == 0:
            return Difference("paired t", True, len(d), diff, diff, diff, None, 0.0,
                              "identical differences at every seed: no test")
        if test == "wilcoxon":
            p = float(stats.wilcoxon(x, y).pvalue)
            name = "Wilcoxon signed-rank"
        else:
            p = float(stats.ttest_rel(x, y).pvalue)
            name = "paired t"
        low, high = _interval_paired(d, interval, confidence, seed)
        return Difference(name, True, len(d), diff, low, high, p, sd)
    if len(a) < 2 or len(b) < 2:
        return Difference("", False, 0, diff, None, None, None, None, "n=1: no interval")
    x, y = np.array(a), np.array(b)
    sd = pooled_std([x, y])
    if x.std(ddof=1) == 0 and y.std(ddof=1) == 0:
        return Difference("Welch t", False, 0, diff, diff, diff, None, 0.0, "no seed-to-seed variation: no test")
    if test == "wilcoxon":
        p = float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)
        name = "Mann-Whitney U"
    else:
        p = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
        name = "Welch t"
    low, high = _interval_unpaired(x, y, interval, confidence, seed)
    return Difference(name, False, 0, diff, low, high, p, sd)


def _bootstrap(samples: tuple, statistic, confidence: float, seed: int) -> tuple[float, float] | None:
    """scipy's BCa bootstrap interval of ``statistic``, or None where it is undefined (e.g. no spread)."""
    from scipy import stats

    low, high = stats.bootstrap(samples, statistic, confidence_level=confidence, random_state=seed).confidence_interval
    return (float(low), float(high)) if math.isfinite(low) and math.isfinite(high) else None


def _mean_difference(u, v, axis=-1):
    return np.mean(u, axis=axis) - np.mean(v, axis=axis)


def _interval_paired(d, interval, confidence, seed):
    from scipy import stats

    found = _bootstrap((d,), np.mean, confidence, seed) if interval == "bootstrap" else None
    if found is not None:
        return found
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def _interval_unpaired(x, y, interval, confidence, seed):
    from scipy import stats

    found = _bootstrap((x, y), _mean_difference, confidence, seed) if interval == "bootstrap" else None
    if found is not None:
        return found
    ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (module docstring), in the given order; None stays None."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def pooled_std(groups) -> float | None:
    """sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)) over the groups with two or more values: the seed-to-seed noise."""
    num = den = 0.0
    for values in groups:
        x = np.asarray(values, dtype=float)
        if len(x) >= 2:
            num += (len(x) - 1) * float(x.var(ddof=1))
            den += len(x) - 1
    return math.sqrt(num / den) if den else None


def power(delta: float, sd: float, n_a: int, n_b: int | None = None, alpha: float = ALPHA) -> float:
    """Power of the two-sided t test for a true difference ``delta``: paired with n_a pairs when n_b is None, else
    unpaired with n_a and n_b runs (module docstring)."""
    from scipy import stats

    if n_b is None:
        df, se = n_a - 1, sd / math.sqrt(n_a)
    else:
        df, se = n_a + n_b - 2, sd * math.sqrt(1 / n_a + 1 / n_b)
    if df < 1 or se <= 0:
        return float("nan")
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(delta) / se
    upper = float(stats.nct.sf(crit, df, nc))
    lower = float(stats.nct.cdf(-crit, df, nc))  # the far tail: negligible, and NaN in scipy for large nc
    return upper + (lower if math.isfinite(lower) else 0.0)


def detectable_difference(sd: float, n_a: int, n_b: int | None = None, alpha: float = ALPHA,
                          target: float = POWER) -> float | None:
    """The smallest difference found with probability ``target`` at this n (None without noise or with n < 2)."""
    from scipy.optimize import brentq

    if not sd or (n_b is None and n_a < 2) or (n_b is not None and n_a + n_b < 3):
        return None
    high = sd
    while power(high, sd, n_a, n_b, alpha) < target:
        high *= 2
    return float(brentq(lambda d: power(d, sd, n_a, n_b, alpha) - target, 0.0, high, xtol=1e-12 * sd))


def seeds_needed(delta: float, sd: float, paired: bool, alpha: float = ALPHA, target: float = POWER,
                 limit: int = 10_000) -> int | None:
    """The smallest number of seeds per variant with which a true difference ``delta`` is found with probability
    ``target``; None when it takes more than ``limit`` (or the difference is 0)."""
    if not delta or sd is None:
        return None
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        return power(delta, sd, n, None if paired else n, alpha) >= target

    low, high = 1, 2
    while not enough(high):
        low, high = high, high * 2
        if high > limit:
            return None
    while high - low > 1:  # power grows with n: bisect for the first n that is enough
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high
