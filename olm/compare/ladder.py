"""Scaling ladders: fit L(C) = E + A C^(-alpha) to each variant's final losses over training compute C, with
intervals from a bootstrap over its runs, and what the fits predict at a larger compute.

The fit minimises the squared error over the runs (every seed of every rung is one point). For a fixed alpha the
law is linear in E and A, so the fit is one-dimensional: a grid over alpha, each point solved exactly by least
squares with E >= 0 and A >= 0, then ``scipy.optimize.minimize_scalar`` around the best grid point. Compute is
divided by the ladder's geometric mean so that A stays in the range of the losses while fitting.

Intervals: resample each rung's runs with replacement (the seeds of one size), refit, and take the 2.5 and 97.5
percentiles over the resamples. A rung of n runs has its deviations from its mean scaled by sqrt(n / (n - 1)) before
resampling (a plain bootstrap's variance is (n - 1) / n of the sample's, which matters with 2 or 3 seeds). A rung
with one run adds no spread, so a ladder with one seed gets no interval. Measured coverage of the nominal 95%
intervals (docs/experiments.md, "Scaling ladders") is below 95% with few seeds: report them as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ALPHAS = np.geomspace(1e-3, 3.0, 400)
MIN_RUNGS = 3


@dataclass
class Fit:
    E: float
    A: float
    alpha: float
    scale: float  # compute unit of the fit: L = E + a (C / scale)^-alpha with a = A scale^-alpha
    rmse: float
    r2: float | None
    points: int

    @property
    def a(self) -> float:
        return self.A * self.scale ** (-self.alpha)

    def predict(self, compute) -> np.ndarray | float:
        return self.E + self.a * (np.asarray(compute, dtype=float) / self.scale) ** (-self.alpha)


def _solve(u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each column of u (points x alphas): (E, a, sse) of min ||E + a u - y||^2 with E, a >= 0."""
    y = y[:, None]
    u_mean, y_mean = u.mean(0), y.mean(0)
    su = ((u - u_mean) ** 2).sum(0)
    suy = ((u - u_mean) * (y - y_mean)).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(su > 0, suy / su, 0.0)
    e = y_mean - a * u_mean
    sse = ((e + a * u - y) ** 2).sum(0)
    # Outside E >= 0, a >= 0 the optimum lies on an edge: E = 0 (a = u.y / u.u) or a = 0 (E = mean y).
    a0 = np.clip((u * y).sum(0) / (u * u).sum(0), 0, None)
    sse_e0 = ((a0 * u - y) ** 2).sum(0)
    e_flat = np.full_like(a, max(float(y_mean[0]), 0.0))
    sse_flat = ((e_flat - y) ** 2).sum(0)
    feasible = (a >= 0) & (e >= 0)
    use_e0 = ~feasible & (sse_e0 <= sse_flat)
    use_flat = ~feasible & ~use_e0
    e = np.where(use_e0, 0.0, np.where(use_flat, e_flat, e))
    a = np.where(use_e0, a0, np.where(use_flat, 0.0, a))
    sse = np.where(use_e0, sse_e0, np.where(use_flat, sse_flat, sse))
    return e, a, sse


def fit_power_law(compute, loss) -> Fit:
    """The least-squares saturating power law through (compute, loss) points (module docstring)."""
    from scipy.optimize import minimize_scalar

    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if len(c) < 3 or len(np.unique(c)) < 2:
        raise ValueError("a power-law fit needs at least 3 points at 2 or more compute values")
    scale = float(np.exp(np.log(c).mean()))
    x = c / scale
    e, a, sse = _solve(x[:, None] ** -ALPHAS[None, :], y)
    best = int(np.argmin(sse))
    lo, hi = ALPHAS[max(best - 1, 0)], ALPHAS[min(best + 1, len(ALPHAS) - 1)]

    def objective(alpha: float) -> float:
        return float(_solve((x ** -alpha)[:, None], y)[2][0])

    result = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    alpha = float(result.x) if result.fun <= sse[best] else float(ALPHAS[best])
    e1, a1, sse1 = (float(v[0]) for v in _solve((x ** -alpha)[:, None], y))
    total = float(((y - y.mean()) ** 2).sum())
    return Fit(E=e1, A=a1 * scale ** alpha, alpha=alpha, scale=scale, rmse=math.sqrt(sse1 / len(y)),
               r2=1 - sse1 / total if total > 0 else None, points=len(y))


@dataclass
class LadderFit:
    fit: Fit
    rungs: dict[str, list[tuple[float, float]]]  # size -> [(compute, loss)] of its runs
    boot: list[Fit] = field(default_factory=list)  # the bootstrap refits

    def interval(self, values: np.ndarray) -> tuple[float, float] | None:
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if len(values) < 2 or np.ptp(values) == 0:
            return None
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))

    def parameter_interval(self, name: str) -> tuple[float, float] | None:
        return self.interval(np.array([getattr(f, name) for f in self.boot])) if self.boot else None

    def prediction(self, compute: float) -> tuple[float, tuple[float, float] | None]:
        point = float(self.fit.predict(compute))
        if not self.boot:
            return point, None
        return point, self.interval(np.array([f.predict(compute) for f in self.boot]))


def fit_ladder(rungs: dict[str, list[tuple[float, float]]], resamples: int = 1000, seed: int = 0) -> LadderFit:
    """Fit every run of every rung, then refit ``resamples`` bootstrap resamples (each rung resampled alone)."""
    points = [p for runs in rungs.values() for p in runs]
    fit = fit_power_law([p[0] for p in points], [p[1] for p in points])
    ladder = LadderFit(fit, rungs)
    if all(len(runs) < 2 for runs in rungs.values()):
        return ladder  # one run per rung: resampling changes nothing
    rng = np.random.default_rng(seed)
    spread = []  # per rung: its mean and its runs' deviations from it, scaled by sqrt(n / (n - 1))
    for runs in rungs.values():
        y = np.array([loss for _, loss in runs])
        scale = math.sqrt(len(y) / (len(y) - 1)) if len(y) > 1 else 1.0
        spread.append((runs, y.mean(), scale * (y - y.mean())))
    for _ in range(resamples):
        sample = []
        for runs, mean, deviations in spread:
            picks = rng.integers(0, len(runs), len(runs))
            sample.extend((runs[i][0], mean + deviations[i]) for i in picks)
        try:
            ladder.boot.append(fit_power_law([p[0] for p in sample], [p[1] for p in sample]))
        except ValueError:
            continue
    return ladder


def crossover(a: LadderFit, b: LadderFit, low: float, high: float) -> float | None:
    """The compute in [low, high] where the two fitted curves cross (the first, on a log grid), or None."""
    from scipy.optimize import brentq

    grid = np.geomspace(low, high, 2000)
    gap = a.fit.predict(grid) - b.fit.predict(grid)
    signs = np.sign(gap)
    change = np.nonzero(signs[:-1] * signs[1:] < 0)[0]
    if len(change) == 0:
        return None
    i = int(change[0])
    f = lambda logc: float(a.fit.predict(math.exp(logc)) - b.fit.predict(math.exp(logc)))  # noqa: E731
    return float(math.exp(brentq(f, math.log(grid[i]), math.log(grid[i + 1]))))


def gap_interval(a: LadderFit, b: LadderFit, compute: float, seed: int = 0) -> tuple[float, tuple | None]:
    """Predicted loss gap a - b at ``compute``, with the 95% interval over paired-up bootstrap refits."""
    point = float(a.fit.predict(compute) - b.fit.predict(compute))
    if not a.boot or not b.boot:
        return point, None
    n = min(len(a.boot), len(b.boot))
    gaps = np.array([a.boot[i].predict(compute) - b.boot[i].predict(compute) for i in range(n)])
    return point, a.interval(gaps)
