"""The report's figures (matplotlib's object API: no pyplot, no global state, rendered with Agg).

One colour per variant, the same in every figure of a study; legends outside the data; titles name the study and
the metric; axes carry units. Curves are the mean over a variant's seeds with a band of +-1 standard deviation;
final metrics are points with 95% intervals, never lines through categories. Variants with no finished run (pruned,
failed, killed) are drawn grey and dashed, ending in a cross. Figures have a fixed size: long variant names are
replaced by short ids (the report's legend table), so that no name can squeeze the axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from olm.compare.study import Study, Variant, lower_is_better, rung_of, units

X_AXES = {"steps": "optimizer steps", "tokens": "tokens seen", "flops": "training FLOPs"}
MAX_CURVES = 10


def colours(study: Study, variants: list[Variant] | None = None) -> dict[int, tuple]:
    """A colour per variant (of ``variants``, all by default), never grey: grey draws the runs that did not finish."""
    from matplotlib import colormaps

    variants = study.variants if variants is None else variants
    name, greys = ("tab10", {7}) if len(variants) <= 9 else ("tab20", {14, 15})
    palette = [colormaps[name](i) for i in range(colormaps[name].N) if i not in greys]
    return {id(v): palette[i % len(palette)] for i, v in enumerate(variants)}


def shown_variants(study: Study, cap: int = MAX_CURVES) -> list[Variant]:
    """At most ``cap`` variants: the baseline and those with the best means of the study's metric."""
    if len(study.variants) <= cap:
        return list(study.variants)
    table = study.tables.get(study.metric)
    sign = 1 if lower_is_better(study.metric) else -1
    ranked = sorted((r for r in table.rows if r.summary is not None), key=lambda r: sign * r.summary.mean) \
        if table else []
    keep = [study.baseline] + [r.variant for r in ranked if r.variant is not study.baseline]
    keep = keep[:cap]
    return [v for v in study.variants if v in keep]


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _x(point, x: str):
    return {"steps": point.step, "tokens": point.tokens, "flops": point.flops}[x]


def curve_band(variant: Variant, curve: str, x: str, rung: str | None):
    """(xs, mean, std or None) over the variant's runs that logged ``curve``, at the steps all of them logged."""
    runs = [r for r in variant.runs if curve in r.curves and (rung is None or rung_of(r) == rung)]
    if any(r.finished for r in runs):  # a killed run would cut the band short at its last step
        runs = [r for r in runs if r.finished]
    if not runs:
        return None
    by_run = [{p.step: p for p in r.curves[curve] if _x(p, x) is not None} for r in runs]
    steps = sorted(set.intersection(*(set(points) for points in by_run)))
    if not steps:
        return None
    xs = np.array([float(np.mean([_x(points[s], x) for points in by_run])) for s in steps])
    values = np.array([[points[s].value for s in steps] for points in by_run])
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else None
    return xs, values.mean(axis=0), std, len(runs)


def _best_ids(study: Study) -> set[str]:
    return {t.id for t in study.optuna.best} if study.optuna else set()


def plot_curves(study: Study, curve: str, x: str, path: Path) -> bool:
    """Mean curve per variant with its seed band; False (nothing written) when no run logged the curve."""
    rung = study.rungs[-1] if study.rungs else None
    unfinished = [v for v in study.variants if not v.finished(rung)]
    shown = [v for v in shown_variants(study) if v not in unfinished]
    # an Optuna study's trials appear in its curves only: colours for the trials drawn keep them apart
    colour = colours(study, shown) if study.optuna else colours(study)
    best = _best_ids(study)
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for variant in shown:
        band = curve_band(variant, curve, x, rung)
        if band is None:
            continue
        xs, mean, std, n = band
        label = variant.label + (" (best)" if variant.id in best else "" if study.optuna else f" (n={n})")
        ax.plot(xs, mean, color=colour[id(variant)], label=label, linewidth=2.2 if variant.id in best else 1.6)
        if std is not None:
            ax.fill_between(xs, mean - std, mean + std, color=colour[id(variant)], alpha=0.2, linewidth=0)
        drawn = True
    statuses = set()
    for variant in unfinished:  # where a pruned trial stopped is the point: drawn, in one style, one legend entry
        band = curve_band(variant, curve, x, rung)
        if band is None:
            continue
        xs, mean = band[0], band[1]
        ax.plot(xs, mean, color="grey", linestyle="--", linewidth=1.0, alpha=0.8)
        ax.plot(xs[-1:], mean[-1:], "x", color="grey", markersize=7, markeredgewidth=1.6)
        if len(unfinished) <= 3:  # more would crowd: the trials table and trials.png name them
            ax.annotate(variant.label, (xs[-1], mean[-1]), xytext=(4, 4), textcoords="offset points", fontsize=7,
                        color="dimgrey")
        statuses |= {r.status for r in variant.runs}
        drawn = True
    if not drawn:
        return False
    if statuses:
        ax.plot([], [], color="grey", linestyle="--", marker="x",
                label=" or ".join(sorted(statuses)) + " (x: where it stopped)")
    what = "train loss" if curve.startswith("train") else "val loss"
    size = f", size {rung}" if rung else ""
    fig.suptitle(f"{study.name}: {what}{size}")
    ax.set_title("one run per trial" if study.optuna else "mean over seeds, band: +-1 standard deviation", fontsize=9)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(f"{what} (nats/token)")
    if x == "flops":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    hidden = len(study.variants) - len(shown) - len(unfinished)
    title = f"{hidden} more {'trials' if study.optuna else 'variants'} not drawn" if hidden else None
    fig.legend(loc="outside right upper", fontsize=8, title=title, title_fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _numeric_axis(study: Study, variants: list[Variant]) -> tuple[str, list[float]] | None:
    """When variants differ in exactly one numeric key: (that key, each variant's value)."""
    if len(study.swept) != 1:
        return None
    key = study.swept[0]
    try:
        return key, [float(dict(v.key)[key]) for v in variants]
    except (KeyError, ValueError):
        return None


def plot_final(study: Study, metric: str, path: Path, cap: int = 30) -> bool:
    table = study.tables.get(metric)
    if table is None:
        return False
    rows = [r for r in table.rows if r.summary is not None]
    if len(rows) > cap:
        keep = set(map(id, shown_variants(study, cap)))
        rows = [r for r in rows if id(r.variant) in keep]
    if not rows:
        return False
    colour = colours(study)
    fig = _figure(max(8.0, min(14.0, 3.0 + 0.6 * len(rows))), 4.5)
    ax = fig.add_subplot()
    numeric = _numeric_axis(study, [r.variant for r in rows])
    for i, row in enumerate(rows):
        s = row.summary
        xpos = numeric[1][i] if numeric else i
        err = None if s.low is None else [[s.mean - s.low], [s.high - s.mean]]
        ax.errorbar([xpos], [s.mean], yerr=err, fmt="o", color=colour[id(row.variant)], capsize=4, markersize=7,
                    label=f"{row.variant.label} (n={s.n})")
        for value in row.variant.values(metric, table.rung):  # the seeds themselves, faint
            ax.plot([xpos], [value], ".", color=colour[id(row.variant)], alpha=0.35)
    base = next((r for r in rows if r.variant is study.baseline), None)
    if base is not None:
        ax.axhline(base.summary.mean, color="grey", linestyle=":", linewidth=1, label="baseline mean")
    if numeric:
        ax.set_xlabel(numeric[0])
        values = [v for v in numeric[1] if v > 0]
        if len(values) == len(numeric[1]) and max(values) / min(values) >= 30:  # log-sampled: a log axis
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        distinct = sorted(set(numeric[1]))
        if len(distinct) <= 12:  # few values: a tick at each, so that labels never crowd
            ax.set_xticks(distinct, [f"{v:.4g}" for v in distinct], fontsize=8)
            ax.xaxis.set_minor_locator(_null_locator())
    else:
        tilt = len(rows) > 3 and max(len(r.variant.label) for r in rows) > 4  # ids (v1, v2) stand upright
        ax.set_xticks(range(len(rows)), [r.variant.label for r in rows], rotation=30 if tilt else 0,
                      ha="right" if tilt else "center", fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xlabel("variant")
    unit = units(metric)
    ax.set_ylabel(f"final {metric}" + (f" ({unit})" if unit else ""))
    size = f", size {table.rung}" if table.rung else ""
    fig.suptitle(f"{study.name}: final {metric}{size}")
    ax.set_title("mean with 95% interval; small dots: the seeds", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def plot_trials(study: Study, path: Path) -> bool:
    """An Optuna study's trials in the order they ran: each complete trial's value with the best so far as a step
    line, pruned trials (a cross at the last value they reported) and failed ones (a mark on the bottom axis)."""
    optuna = study.optuna
    if optuna is None or not optuna.trials:
        return False
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    metric = optuna.objectives[0]
    minimize = optuna.directions[0] == "minimize"
    fig = _figure()
    ax = fig.add_subplot()
    complete = [t for t in optuna.trials if t.values]
    if complete:
        numbers, values = [t.number for t in complete], [t.values[0] for t in complete]
        ax.plot(numbers, values, "o", color="tab:blue", markersize=6, label="complete")
        running = np.minimum.accumulate(values) if minimize else np.maximum.accumulate(values)
        ax.step(numbers, running, where="post", color="tab:blue", alpha=0.5, linewidth=1.2, label="best so far")
    pruned = [t for t in optuna.trials if t.state == "PRUNED" and t.last_reported is not None]
    if pruned:
        ax.plot([t.number for t in pruned], [t.last_reported for t in pruned], "x", color="tab:orange", markersize=8,
                markeredgewidth=2, label="pruned (its last value)")
    failed = [t for t in optuna.trials if t.state == "FAIL"]
    if failed:
        ax.plot([t.number for t in failed], [0.0] * len(failed), "v", color="tab:red", markersize=7, clip_on=False,
                transform=ax.get_xaxis_transform(), label="failed (no value)")
    for best in optuna.best if len(optuna.objectives) == 1 else ():
        ax.plot([best.number], [best.values[0]], "*", color="tab:green", markersize=15, zorder=3,
                label=f"best: {best.id}")
    ax.set_xlim(-0.5, max(t.number for t in optuna.trials) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(20, len(optuna.trials))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"t{int(value)}"))
    ax.set_xlabel("trial, in the order it was proposed")
    unit = units(metric)
    ax.set_ylabel(metric + (f" ({unit})" if unit else ""))
    fig.suptitle(f"{study.name}: {metric} of each trial")
    ax.set_title(f"Optuna study {optuna.name}; {'lower' if minimize else 'higher'} is better", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def plot_ladder(study: Study, path: Path) -> bool:
    fitted = [e for e in study.ladder if e.fit is not None]
    points = [e for e in study.ladder if e.fit is not None or e.variant.finished()]
    if not points:
        return False
    colour = colours(study)
    fig = _figure(8.5, 5.0)
    ax = fig.add_subplot()
    target = study.target_compute
    for entry in points:
        c = colour[id(entry.variant)]
        rungs = entry.fit.rungs if entry.fit else {}
        for runs in rungs.values():
            computes = np.array([p[0] for p in runs])
            losses = np.array([p[1] for p in runs])
            std = losses.std(ddof=1) if len(losses) > 1 else 0.0
            ax.errorbar([computes.mean()], [losses.mean()], yerr=[[std], [std]] if std else None, fmt="o", color=c,
                        capsize=3, markersize=6)
        if entry.fit is None:
            continue
        fit = entry.fit.fit  # the caption holds the formula: L = E + A C^-alpha
        lo = min(p[0] for runs in rungs.values() for p in runs)
        hi = max(p[0] for runs in rungs.values() for p in runs)
        xs = np.geomspace(lo, hi, 100)
        ax.plot(xs, fit.predict(xs), color=c, linewidth=1.6,
                label=f"{entry.variant.label}: E={fit.E:.3g}, alpha={fit.alpha:.3g}")
        if target is not None and target > hi:
            ext = np.geomspace(hi, target, 60)
            ax.plot(ext, fit.predict(ext), color=c, linestyle="--", linewidth=1.2)
            if entry.prediction is not None:
                value, interval = entry.prediction
                err = None if interval is None else [[value - interval[0]], [interval[1] - value]]
                ax.errorbar([target], [value], yerr=err, fmt="D", color=c, capsize=3, markersize=5)
    if target is not None:
        ax.axvline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3g} FLOPs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    unit = units(study.metric)
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(f"final {study.metric}" + (f" ({unit})" if unit else ""))
    fig.suptitle(f"{study.name}: {study.metric} against compute")
    ax.set_title("fit L = E + A C^-alpha per variant; points: mean +- std over seeds", fontsize=9)
    if target:
        ax.plot([], [], color="grey", linestyle="--", label="extrapolated fit")
    ax.grid(alpha=0.3, which="both")
    if fitted or target is not None:
        fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _plain_log_ticks(axis) -> None:
    """Log-axis labels as plain numbers (3.5, not 3.5 x 10^0): losses span less than a decade."""
    from matplotlib.ticker import FormatStrFormatter

    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()
