"""``olm compare``'s output: report.md (tables and PNGs), the same numbers as CSV and JSON, and report.html, one
self-contained file (figures embedded, nothing fetched) that reads well in a browser."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from olm.compare import plots, stats
from olm.compare.runs import Run, load_runs
from olm.compare.study import (LONG_LABEL, MetricTable, Options, Study, analyse, fmt_value, legend_table,
                               lower_is_better, overrides, rung_of, study_dir_name, units)
from olm.compare.trials import OptunaStudy
from olm.errors import ConfigError

Table = tuple[list[str], list[list[str]]]  # header, rows of cells (markdown; ** marks bold)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def _interval(low, high, spec=".4f") -> str:
    return "—" if low is None else f"[{format(low, spec)}, {format(high, spec)}]"


def _signed(value, spec=".4f") -> str:
    return "—" if value is None else format(value, "+" + spec)


def primary_table(study: Study, table: MetricTable) -> Table:
    header = ["variant", "n", "mean", "std", "95% CI", "Δ vs baseline", "95% CI of Δ", "test", "p (Holm)", "verdict",
              "detectable Δ", "seeds for Δ"]
    rows = []
    for row in table.rows:
        s, d = row.summary, row.diff
        name = row.variant.label + (" (baseline)" if row.variant is study.baseline else "")
        if table.best is row.variant:
            name = f"**{name}** (best)"
        if s is None:
            rows.append([name, "0", "—", "—", "—", "—", "—", "—", "—", "no finished run", "—", "—"])
            continue
        interval = "n=1: no interval" if s.n == 1 else _interval(s.low, s.high)
        rows.append([
            name, str(s.n), _fmt(s.mean), _fmt(s.std), interval,
            _signed(d.diff) if d else "", _interval(d.low, d.high) if d else "",
            (d.test + (f", {d.n_pairs} pairs" if d.paired else "")) if d and d.test else "",
            _p(row.p_holm) if d else "", row.verdict,
            _fmt(row.detectable) if d else "", (str(row.seeds_needed) if row.seeds_needed else "—") if d else "",
        ])
    return header, rows


def metrics_table(study: Study) -> Table:
    metrics = [m for m in study.metrics if m in study.tables]
    header = ["variant", *[f"{m} ({units(m)})" if units(m) else m for m in metrics]]
    rows = []
    for i, variant in enumerate(study.variants):
        cells = [variant.label + (" (baseline)" if variant is study.baseline and study.optuna is None else "")]
        for metric in metrics:
            row = study.tables[metric].rows[i]
            if row.summary is None:
                cells.append("—")
                continue
            s = row.summary
            spec = ",.0f" if metric == "tokens_per_sec" else ".4f"
            half = "" if s.low is None else f" ± {format((s.high - s.low) / 2, spec)}"
            mark = {"better": " (better)", "worse": " (worse)"}.get(row.verdict, "")
            cells.append(f"{format(s.mean, spec)}{half}{mark}")
        rows.append(cells)
    return header, rows


def ladder_table(study: Study) -> Table:
    target = study.target_compute
    header = ["variant", "sizes", "runs", "E", "A", "alpha (95% CI)", "RMSE", "R²"]
    if target is not None:
        header += [f"predicted at {target:.3g} FLOPs", "gap vs baseline"]
    header.append("crossover with baseline")
    rows = []
    for entry in study.ladder:
        name = entry.variant.label + (" (baseline)" if entry.variant is study.baseline else "")
        if entry.fit is None:
            rows.append([name, "—", "—", f"no fit: {entry.note}", *[""] * (len(header) - 4)])
            continue
        fit, lf = entry.fit.fit, entry.fit
        alpha_ci = lf.parameter_interval("alpha")
        cells = [name, str(len(lf.rungs)), str(fit.points), f"{fit.E:.4f}", f"{fit.A:.4g}",
                 f"{fit.alpha:.4f}" + (f" [{alpha_ci[0]:.4f}, {alpha_ci[1]:.4f}]" if alpha_ci else " (n=1: no CI)"),
                 f"{fit.rmse:.2g}", _fmt(fit.r2, ".4f")]
        if target is not None:
            value, interval = entry.prediction
            cells.append(f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""))
            if entry.gap is None:
                cells.append("")
            else:
                gap, gi = entry.gap
                cells.append(f"{gap:+.4f}" + (f" [{gi[0]:+.4f}, {gi[1]:+.4f}]" if gi else ""))
        base_fitted = any(e.fit is not None and e.variant is study.baseline for e in study.ladder)
        if entry.variant is study.baseline or not base_fitted:
            cells.append("" if entry.variant is study.baseline else "— (no baseline fit)")
        else:
            cells.append(f"{entry.crossover:.3g} FLOPs" if entry.crossover else "none in range")
        rows.append(cells)
    return header, rows


def rung_table(study: Study) -> Table:
    header = ["variant", *[f"size {r}" for r in study.rungs]]
    rows = []
    for variant in study.variants:
        cells = [variant.label]
        for rung in study.rungs:
            s = [v for v in variant.values(study.metric, rung)]
            if not s:
                cells.append("—")
                continue
            d = stats.describe(s)
            compute = [r.summary.get("train_flops") for r in variant.finished(rung)]
            flops = f", {max(c for c in compute if c):.3g} FLOPs" if any(compute) else ""
            cells.append(f"{d.mean:.4f}" + (f" ± {(d.high - d.low) / 2:.4f}" if d.low is not None else "")
                         + f" (n={d.n}{flops})")
        rows.append(cells)
    return header, rows


def _value(value: Any) -> str:
    """A parameter's value for a table: long floats to 4 significant digits (JSON and CSV keep every digit)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return fmt_value(None if value is None else str(value))  # an override's text, from a run dir


def trials_table(optuna: OptunaStudy) -> Table:
    """Every trial of an Optuna study, in the order it ran: its id (the report's name for it), state, value(s),
    the step it last reported at, and its parameters."""
    params = optuna.params
    best = {t.number for t in optuna.best}
    header = ["trial", "state", *optuna.objectives, "last reported step", *params, "run"]
    rows = []
    for trial in optuna.trials:
        name = f"**{trial.id}** (best)" if trial.number in best and len(optuna.objectives) == 1 else (
            f"**{trial.id}** (Pareto front)" if trial.number in best else trial.id)
        state = trial.state_word
        if trial.state == "PRUNED" and trial.last_step is not None:
            state = f"pruned at step {trial.last_step}"
        if trial.values:
            values = [_fmt(v) for v in trial.values]
        elif trial.last_reported is not None and len(optuna.objectives) == 1:
            values = [f"({_fmt(trial.last_reported)} last reported)"]
        else:
            values = ["—"] * len(optuna.objectives)
        rows.append([name, state, *values, str(trial.last_step) if trial.last_step is not None else "—",
                     *[_value(trial.params.get(k)) for k in params], trial.run.label if trial.run else "—"])
    return header, rows


def importance_table(optuna: OptunaStudy) -> Table:
    objectives = list(optuna.importances)
    first = optuna.importances[objectives[0]]
    best = optuna.best[0] if len(optuna.best) == 1 else None
    header = ["parameter", *[f"importance for {o}" if len(objectives) > 1 else "importance" for o in objectives],
              *(["best trial's value"] if best else [])]
    rows = [[name, *[_fmt(optuna.importances[o].get(name), ".3f") for o in objectives],
             *([_value(best.params.get(name))] if best else [])]
            for name in sorted(first, key=lambda k: -first[k])]
    return header, rows


def _optuna_line(study: Study) -> str:
    optuna = study.optuna
    how = ", ".join(part for part in (f"sampler {optuna.sampler}" if optuna.sampler else "",
                                      f"pruner {optuna.pruner}" if optuna.pruner else "") if part)
    goal = ", ".join(f"{d} {o}" for o, d in zip(optuna.objectives, optuna.directions))
    where = f" in `{optuna.storage}`" if optuna.storage else ""
    return (f"Optuna study `{optuna.name}`{where} ({how + '; ' if how else ''}{goal}). Each trial is one run, named "
            "by its trial number in the tables and figures (`t3`: trial 3, job dir `3`).")


def runs_table(study: Study) -> Table:
    header = ["run", "variant", "seed", *(["size"] if study.rungs else []), "status", study.metric, "tokens seen",
              "tokens/s", "path"]
    rows = []
    for variant in study.variants:
        for run in variant.runs:
            value = run.metric(study.metric)
            shown = _fmt(value) if value is not None else (
                f"val loss {_fmt(run.last_logged())} (last logged)" if run.last_logged() is not None else "—")
            status = run.status + (f": {run.error}" if run.error else "")
            tokens = run.summary.get("tokens_seen")
            tps = run.summary.get("tokens_per_sec")
            rows.append([run.label, variant.label, str(run.seed), *([str(rung_of(run))] if study.rungs else []),
                         status, shown, f"{tokens:,}" if isinstance(tokens, int) else "—",
                         f"{tps:,.0f}" if isinstance(tps, (int, float)) else "—", str(run.path)])
    return header, rows


def set_aside_lines(study: Study) -> list[str]:
    """A line per status of the runs that ended without a result: ``- failed (2): `a` (why), `b` (why)``."""
    lines = []
    for status in dict.fromkeys(r.status for r in study.set_aside):
        runs = [r for r in study.set_aside if r.status == status]
        shown = ", ".join(f"`{r.label}`" + (f" ({r.error})" if r.error else "") for r in runs)
        lines.append(f"- {status} ({len(runs)}): {shown}")
    return lines


def _md(table: Table) -> str:
    header, rows = table
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    header, rows = table

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_bold(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- the report ---------------------------------------------------------------------------------------------------
def _verdict_line(study: Study) -> str:
    table = study.tables.get(study.metric)
    if table is None:
        return ""
    direction = "lower" if lower_is_better(study.metric) else "higher"
    size = f" at size {table.rung}" if table.rung else ""
    parts = [f"Ranked by **{study.metric}**{size} ({units(study.metric) or 'value'}, {direction} is better) against "
             f"the baseline **{study.baseline.label}**."]
    for row in table.rows:
        if row.diff is not None:
            parts.append(f"{row.variant.label}: **{row.verdict}** ({_signed(row.diff.diff)}, p={_p(row.p_holm)}).")
    if table.best_note:
        parts.append(table.best_note)
    return " ".join(parts)


def _noise_line(study: Study) -> str:
    alpha = study.alpha
    table = study.tables.get(study.metric)
    if table is None or table.noise is None:
        return "Noise floor: one seed per variant, so the seed-to-seed spread is unknown; run seeds=3 or more."
    line = (f"Noise floor: the seed-to-seed standard deviation of {study.metric} is {table.noise:.4f} (pooled over "
            f"variants). \"detectable Δ\" is the smallest true difference this many seeds find with power 0.8 at "
            f"alpha {alpha:g}; \"seeds for Δ\" the seeds per variant that would find the observed difference.")
    if table.detect is not None:
        delta, needed = table.detect
        line += (f" To detect a difference of {delta:g}: {needed} seeds per variant." if needed else
                 f" A difference of {delta:g} needs more than 10,000 seeds.")
    return line


def write_report(paths: list[str | Path], out: str | Path, options: Options | None = None, *,
                 x: str = "tokens") -> dict[str, Any]:
    """Write the report into ``out``: report.md, report.html, variants.csv, runs.csv (ladder.csv for ladders),
    report.json and the PNGs. Returns {"studies", "runs", "files", "text"} (text: the markdown)."""
    options = options or Options()
    if x not in plots.X_AXES:
        raise ConfigError(f"--x={x!r} is not known; known: {', '.join(plots.X_AXES)}")
    if options.test not in stats.TESTS:
        raise ConfigError(f"--test={options.test!r} is not known; known: {', '.join(stats.TESTS)}")
    if options.interval not in stats.INTERVALS:
        raise ConfigError(f"--ci={options.interval!r} is not known; known: {', '.join(stats.INTERVALS)}")
    if not 0 < options.alpha < 1:
        raise ConfigError(f"--alpha={options.alpha} must be between 0 and 1 (e.g. 0.05)")
    if options.detect is not None and not options.detect > 0:
        raise ConfigError(f"--detect={options.detect} must be a difference > 0, in the metric's units")
    if options.resamples < 1:
        raise ConfigError(f"--resamples={options.resamples} must be a positive number of bootstrap resamples")
    if options.target_compute is not None and not options.target_compute > 0:
        raise ConfigError(f"--target-compute={options.target_compute} must be a number of FLOPs > 0 (e.g. 1e18)")
    runs = load_runs(paths)
    studies = analyse(runs, options)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out={str(out)!r} cannot be created: {exc.strerror or exc}") from exc
    files: list[Path] = []
    md: list[str] = ["# Run comparison", ""]
    body_html: list[str] = []
    if len(studies) > 1:
        md += [f"{len(runs)} runs in {len(studies)} studies: " + ", ".join(f"[{s.name}](#{_anchor(s.name)})"
                                                                           for s in studies) + ".", ""]
    for study in studies:
        section, section_html, written = _study_section(study, studies, out, x)
        md += section
        body_html += section_html
        files += written
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_html_page(body_html))
    files[:0] = [out / "report.md", out / "report.html"]
    files += _write_data(studies, out)
    return {"studies": studies, "runs": runs, "files": files, "text": text}


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _study_section(study: Study, studies: list[Study], out: Path, x: str):
    where = out / study_dir_name(study, studies)
    where.mkdir(parents=True, exist_ok=True)
    prefix = "" if where == out else f"{where.name}/"
    md: list[str] = [f"## {study.name}", ""]
    lead = list(study.headline)  # paragraphs before any table: the best trial first
    if study.question:
        lead.append(f"*Question:* {study.question}")
    finished = sum(r.finished for r in study.runs)
    lead.append(f"{len(study.runs)} runs, {finished} finished, in {len(study.variants)} variants"
                + (f" at {len(study.rungs)} sizes ({', '.join(study.rungs)})" if study.rungs else "") + ".")
    optuna = study.optuna
    if optuna is not None:
        lead += [_optuna_line(study), *([optuna.storage_note] if optuna.storage_note else [])]
    elif study.legend:
        lead.append(f"Variants go by ids (their names run past {LONG_LABEL} characters); the table below gives "
                    "each id's values.")
    md += [line for paragraph in lead for line in (paragraph, "")]
    figures: list[tuple[str, str]] = []  # (file name inside the report, caption)
    written: list[Path] = []
    tables: list[tuple[str, Table]] = []
    if optuna is not None:
        tables.append(("Trials", trials_table(optuna)))
        md += ["### Trials", "", _md(tables[-1][1]), ""]
        md += ["### Parameter importance", "", optuna.importance_note, ""]
        if optuna.importances:
            tables.append(("Parameter importance", importance_table(optuna)))
            md += [_md(tables[-1][1]), ""]
    elif study.legend:
        tables.append(("Variants", legend_table(study)))
        md += ["### Variants", "", _md(tables[-1][1]), ""]
    table = study.tables.get(study.metric)
    if table is not None:
        if optuna is None:  # one run per trial: no intervals, no verdicts; the trials table holds the values
            md += [_verdict_line(study), ""]
            tables.append((f"{study.metric} by variant", primary_table(study, table)))
            md += [f"### {study.metric} by variant" + (f" (size {table.rung})" if table.rung else ""), "",
                   _md(tables[-1][1]), "", _noise_line(study), ""]
        if len(study.tables) > 1:
            tables.append(("Every logged metric", metrics_table(study)))
            md += ["### Every logged metric" + ("" if optuna else " (mean ± 95% CI half-width; verdict against the "
                                                    "baseline)"), "",
                   _md(tables[-1][1]), ""]
    if study.rungs:
        tables.append(("Sizes", rung_table(study)))
        md += [f"### Scaling ladder: {study.metric} at each size", "", _md(tables[-1][1]), ""]
        if study.ladder:
            tables.append(("Fits", ladder_table(study)))
            md += ["Fit per variant: L(C) = E + A C^-alpha over training compute C (FLOPs), intervals from a "
                   "bootstrap over each size's seeds (docs/experiments.md, \"Scaling ladders\").", "",
                   _md(tables[-1][1]), ""]
    md += [line for line in study.notes] + [""]
    values = (("trials.png", f"{optuna.objectives[0]} of each trial", lambda p: plots.plot_trials(study, p))
              if optuna else  # one run per trial: the trials in the order they ran, not points with intervals
              ("final.png", f"final {study.metric} by variant", lambda p: plots.plot_final(study, study.metric, p)))
    for name, caption, draw in (
        values,
        ("val_loss.png", f"val loss against {plots.X_AXES[x]}", lambda p: plots.plot_curves(study, "val/loss", x, p)),
        ("train_loss.png", f"train loss against {plots.X_AXES[x]}",
         lambda p: plots.plot_curves(study, "train/loss", x, p)),
        ("ladder.png", f"{study.metric} against training compute", lambda p: plots.plot_ladder(study, p)
         if study.rungs else False),
    ):
        if draw(where / name):
            figures.append((prefix + name, caption))
            written.append(where / name)
    md += [f"![{caption}]({name})\n" for name, caption in figures]
    excluded = study.excluded
    if excluded:
        md += ["Left out of the statistics (not finished):", *[
            f"- `{r.label}`: {r.status}" + (f" ({r.error})" if r.error else "") for r in excluded], ""]
    if study.set_aside:
        md += ["Ended without a result (never ranked):", *set_aside_lines(study), ""]
    tables.append(("Runs", runs_table(study)))
    md += ["### Runs", "", _md(tables[-1][1]), ""]
    section_html = [f"<h2 id=\"{_anchor(study.name)}\">{html.escape(study.name)}</h2>"]
    section_html += [f"<p>{_bold(paragraph).replace('*Question:*', '<i>Question:</i>')}</p>" for paragraph in lead]
    if optuna is not None:
        section_html.append(f"<p>{_bold(optuna.importance_note)}</p>")
    elif table is not None:
        section_html.append(f"<p>{_bold(_verdict_line(study))}</p><p>{html.escape(_noise_line(study))}</p>")
    for title, t in tables:
        section_html += [f"<h3>{html.escape(title)}</h3>", _html_table(t)]
    section_html += [f"<p>{_bold(line)}</p>" for line in study.notes if line and not line.startswith("- ")]
    section_html += [f"<ul>{''.join(f'<li>{_bold(line[2:])}</li>' for line in study.notes if line.startswith('- '))}</ul>"]
    if study.set_aside:
        section_html.append("<p>Ended without a result (never ranked):</p><ul>" + "".join(
            f"<li>{html.escape(line[2:])}</li>" for line in set_aside_lines(study)) + "</ul>")
    for name, caption in figures:
        data = base64.b64encode((out / name).read_bytes()).decode()
        section_html.append(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,{data}\">"
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return md, section_html, written


def _bold(text: str) -> str:
    """A line of the markdown report as HTML: escaped, **bold** as <b>, `code` marks dropped."""
    text = html.escape(text)
    while text.count("**") >= 2:
        text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return text.replace("`", "")


def _html_page(body: list[str]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:0.9em}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>olm compare</title>"
            f"<style>{style}</style></head><body><h1>Run comparison</h1>{''.join(body)}</body></html>\n")


# -- data files ---------------------------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def variant_records(study: Study) -> list[dict[str, Any]]:
    records = []
    for metric, table in study.tables.items():
        for row in table.rows:
            s, d = row.summary, row.diff
            records.append({
                "study": study.name, "metric": metric, "size": table.rung, "variant": row.variant.label,
                "id": row.variant.id, "description": row.variant.description,
                "baseline": row.variant is study.baseline, "n": s.n if s else 0, "mean": s.mean if s else None,
                "std": s.std if s else None, "ci_low": s.low if s else None, "ci_high": s.high if s else None,
                "diff": d.diff if d else None, "diff_low": d.low if d else None, "diff_high": d.high if d else None,
                "test": d.test if d else None, "paired": d.paired if d else None, "p": d.p if d else None,
                "p_holm": row.p_holm, "verdict": row.verdict, "detectable_diff": row.detectable,
                "seeds_needed": row.seeds_needed, "best": table.best is row.variant,
                "noise_std": table.noise,
            })
    return records


def run_records(study: Study) -> list[dict[str, Any]]:
    records = []
    for variant in study.variants:
        for run in variant.runs:
            record = {"study": study.name, "variant": variant.label, "id": variant.id, "run": run.label,
                      "seed": run.seed, "size": rung_of(run), "status": run.status, "error": run.error,
                      "path": str(run.path)}
            for metric in study.metrics:
                record[metric] = run.metric(metric)
            record["last_val_loss"] = run.last_logged()
            for key in ("num_parameters", "tokens_seen", "train_flops", "mfu"):
                record[key] = run.summary.get(key)
            records.append(record)
    in_variants = {id(run) for variant in study.variants for run in variant.runs}
    for run in study.set_aside:
        if id(run) in in_variants:  # recorded with its variant above
            continue
        records.append({"study": study.name, "variant": None, "run": run.label, "seed": run.seed,
                        "size": rung_of(run), "status": run.status, "error": run.error, "path": str(run.path)})
    return records


def ladder_records(study: Study) -> list[dict[str, Any]]:
    records = []
    for entry in study.ladder:
        record: dict[str, Any] = {"study": study.name, "variant": entry.variant.label, "metric": study.metric,
                                  "note": entry.note or None}
        if entry.fit is not None:
            fit = entry.fit.fit
            record.update(E=fit.E, A=fit.A, alpha=fit.alpha, rmse=fit.rmse, r2=fit.r2, points=fit.points,
                          sizes=len(entry.fit.rungs))
            for name in ("E", "A", "alpha"):
                interval = entry.fit.parameter_interval(name)
                record[f"{name}_low"], record[f"{name}_high"] = interval or (None, None)
            if entry.prediction is not None:
                value, interval = entry.prediction
                record.update(target_compute=study.target_compute, predicted=value,
                              predicted_low=interval[0] if interval else None,
                              predicted_high=interval[1] if interval else None)
            if entry.gap is not None:
                gap, interval = entry.gap
                record.update(gap=gap, gap_low=interval[0] if interval else None,
                              gap_high=interval[1] if interval else None)
            record["crossover_compute"] = entry.crossover
        records.append(record)
    return records


def optuna_record(optuna: OptunaStudy) -> dict[str, Any]:
    return {
        "study_name": optuna.name, "storage": optuna.storage, "objectives": optuna.objectives,
        "directions": optuna.directions, "sampler": optuna.sampler, "pruner": optuna.pruner,
        "best": [{"id": t.id, "trial": t.number, "values": t.values, "params": t.params,
                  "overrides": overrides(t.params)} for t in optuna.best],
        "importances": optuna.importances, "importance_note": optuna.importance_note,
        "trials": [{"id": t.id, "trial": t.number, "state": t.state, "values": t.values, "params": t.params,
                    "last_step": t.last_step, "last_reported": t.last_reported,
                    "run": str(t.run.path) if t.run else None} for t in optuna.trials],
    }


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def _write_data(studies: list[Study], out: Path) -> list[Path]:
    variants = [r for s in studies for r in variant_records(s)]
    runs = [r for s in studies for r in run_records(s)]
    ladder = [r for s in studies for r in ladder_records(s)]
    files = []
    for name, records in (("variants.csv", variants), ("runs.csv", runs), ("ladder.csv", ladder)):
        if records:
            _write_csv(out / name, records)
            files.append(out / name)
    document = {"studies": [{
        "name": s.name, "question": s.question, "metric": s.metric, "baseline": s.baseline.label if s.baseline else None,
        "swept": s.swept, "sizes": s.rungs, "notes": s.notes,
        "best": s.tables[s.metric].best.label if s.metric in s.tables and s.tables[s.metric].best else None,
        "legend": {v.id: dict(v.key) for v in s.variants},
        "optuna": optuna_record(s.optuna) if s.optuna else None,
        "variants": variant_records(s), "runs": run_records(s), "ladder": ladder_records(s),
    } for s in studies]}
    (out / "report.json").write_text(json.dumps(_clean(document), indent=2) + "\n")
    files.append(out / "report.json")
    return files
