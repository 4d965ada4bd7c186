"""`olm compare`: one table and two plots from run dirs, so the variants of a sweep can be compared fairly.

A run dir is what `olm-train` writes (``.hydra/overrides.yaml``, ``config.yaml``, ``metrics.csv``, ``summary.json``);
any other directory given is searched for run dirs, so a multirun dir expands to its jobs. Runs without a
``summary.json`` (killed, crashed, still running) are kept and marked unfinished, with the last val loss logged.

The report (``report.md``) has one row per run: the overrides that differ between the runs, parameters, tokens
seen, final val loss, val bits/byte, tokens/s and MFU, with the best finished run marked; a fairness note (did all
runs see the same tokens in the same order, for the same budget?); and two plots: ``val_loss.png`` (val loss against
tokens seen, all runs) and ``final_<metric>.png`` (final metric against each swept parameter).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from olm.errors import ConfigError

METRICS = {"val_loss": "val loss", "val_bpb": "val bits/byte"}
FORMATS = ("md", "csv", "json")
# Config keys that decide which tokens a run sees, in which order, and for how long.
FAIRNESS_KEYS = ("data.source", "data.path", "data.pattern", "data.tokenizer", "data.tokenizer_vocab_size",
                 "data.tokenizer_path", "data.seed", "data.seq_len", "data.batch_size", "data.val_fraction",
                 "data.val_batches", "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.devices",
                 "trainer.num_nodes")
SKIP_DIRS = {".hydra", "checkpoints", "model", "wandb", "__pycache__"}
# Overrides that do not change what a run learns; never shown as what differs between runs.
NOT_VARIANTS = ("paths.", "logger", "trainer.enable_progress_bar", "sample.", "export", "resume", "ckpt_path")


@dataclass
class Run:
    path: Path
    label: str = ""
    status: str = "unfinished"
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # flattened: "data.seed" -> 0
    summary: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, val loss)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def value(self, key: str) -> Any:
        """A summary value; for runs without a summary, the last logged val loss/bpb (tokens seen from the curve)."""
        if key in self.summary or self.finished:
            return self.summary.get(key)
        if key == "val_loss" and self.curve:
            return self.curve[-1][1]
        if key == "tokens_seen" and self.curve:
            return int(self.curve[-1][0])
        return None


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (".hydra/overrides.yaml", "summary.json", "metrics.csv"))


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run dirs in ``paths``: a run dir is itself, any other directory is searched (a multirun dir gives its jobs)."""
    found: list[Path] = []
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise ConfigError(f"{str(given)!r} is not a directory")
        if is_run_dir(root):
            found.append(root)
            continue
        inside = []
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if here != root and is_run_dir(here):
                inside.append(here)
                dirnames.clear()  # a run dir's subfolders are its own (checkpoints, model, wandb)
            else:
                dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        if not inside:
            raise ConfigError(f"{str(given)!r} holds no run dirs (no .hydra/overrides.yaml, metrics.csv, summary.json)")
        found.extend(sorted(inside, key=_natural_key))
    return list(dict.fromkeys(p.resolve() for p in found))


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _parse_overrides(lines: Any) -> dict[str, str]:
    overrides = {}
    for line in lines if isinstance(lines, list) else []:
        key, sep, value = str(line).partition("=")
        if sep:
            overrides[key.lstrip("+~")] = value
    return overrides


def _read_curve(path: Path) -> list[tuple[float, float]]:
    """(tokens seen, val loss) for every validation row of metrics.csv; tokens come from the train row of that step."""
    try:
        with open(path, newline="") as f:
            rows = [{k: _parse_float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, csv.Error):
        return []
    tokens_at, per_step = {}, None
    for row in rows:
        if row.get("tokens_seen") is not None and row.get("step") is not None:
            tokens_at[int(row["step"])] = row["tokens_seen"]
            per_step = row["tokens_seen"] / (int(row["step"]) + 1)  # logged steps count from 0
    curve = []
    for row in rows:
        if row.get("val/loss") is None or row.get("step") is None:
            continue
        step = int(row["step"])
        tokens = row.get("tokens_seen") or tokens_at.get(step) or (per_step and (step + 1) * per_step)
        if tokens:
            curve.append((tokens, row["val/loss"]))
    return curve


def load_run(path: Path) -> Run:
    run = Run(path=path)
    run.overrides = _parse_overrides(_read_yaml(path / ".hydra" / "overrides.yaml"))
    config = _read_yaml(path / "config.yaml")  # resolved by olm-train; .hydra/config.yaml may hold interpolations
    if not isinstance(config, dict):
        config = _read_yaml(path / ".hydra" / "config.yaml")
    run.config = _flatten(config) if isinstance(config, dict) else {}
    run.curve = _read_curve(path / "metrics.csv")
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        run.summary = summary
        run.status = str(summary.get("status") or "finished")
        run.error = summary.get("error")
    else:
        run.error = _logged_error(path)
        run.status = "failed" if run.error else "unfinished"
    return run


def _logged_error(path: Path) -> str | None:
    """The last ERROR line of the job's log (<job name>.log): olm-train logs its configuration errors there."""
    error = None
    for log in path.glob("*.log"):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "][ERROR] - " in line:
                error = line.split("][ERROR] - ", 1)[1].strip()
    return error


def load_runs(paths: list[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in find_run_dirs(paths)]
    common = Path(os.path.commonpath([r.path for r in runs]))
    for run in runs:
        run.label = str(run.path.relative_to(common)) if len(runs) > 1 else run.path.name
        if run.label in ("", "."):
            run.label = run.path.name
    return runs


def differing_overrides(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (a key missing from a run counts as different)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides if not k.startswith(NOT_VARIANTS)))
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def leaks_targets(run: Run) -> bool:
    """A bidirectional model (model.causal=false) sees the next token it is scored on: its loss is no LM loss."""
    return run.config.get("model.causal") is False


def best_run(runs: list[Run], metric: str) -> Run | None:
    scored = [r for r in runs if r.finished and not leaks_targets(r) and _is_number(r.summary.get(metric))]
    return min(scored, key=lambda r: r.summary[metric]) if scored else None


def fairness_notes(runs: list[Run]) -> list[str]:
    """Markdown lines: what makes the runs comparable (same data, order and budget), or what differs between them."""
    notes = []
    for key in FAIRNESS_KEYS:
        values = {repr(r.config.get(key)) for r in runs if r.config}
        if len(values) > 1:
            notes.append(f"- `{key}` differs between runs: {', '.join(sorted(values))}")
    tokens = sorted({r.summary.get("tokens_seen") for r in runs if r.finished}, key=lambda t: (t is None, t or 0))
    if len(tokens) > 1:
        notes.append(f"- finished runs saw different numbers of tokens: {', '.join(_fmt_int(t) for t in tokens)}")
    leaky = [r.label for r in runs if leaks_targets(r)]
    leak = ["", f"**Leak:** model.causal=false in {', '.join(leaky)}: each position also sees the token it is scored "
            "on, so that next-token loss is no language-model loss (never marked best)."] if leaky else []
    if notes:
        return ["**Not a like-for-like comparison** (different data, data order or budget):", *notes, *leak]
    first = next((r for r in runs if r.config), None)
    if first is None:
        return leak
    data = ", ".join(f"{k.split('.', 1)[1]}={first.config.get(k)}"
                     for k in ("data.source", "data.seed", "data.seq_len", "data.batch_size"))
    budget = f"{_fmt_int(tokens[0])} tokens each" if tokens else f"{first.config.get('trainer.max_steps')} steps each"
    return [f"Same data in the same order for every run ({data}) and the same budget: {budget}.", *leak]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt_int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if _is_number(value) else "—"


def _fmt_override(value: str | None) -> str:
    """An override value for the table: long floats (Optuna's) to 4 digits, `|` escaped for markdown."""
    if value is None:
        return "—"
    number = _parse_float(value)
    if number is not None and "." in value and len(value) > 8:
        return f"{number:.4g}"
    return value.replace("|", "\\|")


VALUE_COLUMNS = ("num_parameters", "tokens_seen", "val_loss", "val_bpb", "tokens_per_sec", "mfu")


def table_rows(runs: list[Run], metric: str) -> list[dict[str, Any]]:
    """One dict of raw values per run, in run order: run, status, differing overrides, VALUE_COLUMNS, best, path."""
    keys = differing_overrides(runs)
    best = best_run(runs, metric)
    rows = []
    for r in runs:
        row = {"run": r.label, "status": r.status, **{k: r.overrides.get(k) for k in keys}}
        for key in VALUE_COLUMNS:
            row[key] = r.value(key)
        row["best"] = r is best
        row["error"] = r.error
        row["path"] = str(r.path)
        rows.append(row)
    return rows


def markdown_table(runs: list[Run], metric: str) -> str:
    keys, rows = differing_overrides(runs), table_rows(runs, metric)
    header = ["", "run", "status", *keys, "params", "tokens seen", "val loss", "val bpb", "tokens/s", "MFU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---"] * len(keys) + ["---:"] * 6) + "|"]
    for row in rows:
        unfinished = row["status"] != "finished"
        loss = _fmt(row["val_loss"], ".4f") + (" (last logged)" if unfinished and row["val_loss"] is not None else "")
        cells = ["**best**" if row["best"] else "", row["run"], row["status"],
                 *[_fmt_override(row[k]) for k in keys], _fmt_int(row["num_parameters"]), _fmt_int(row["tokens_seen"]),
                 loss, _fmt(row["val_bpb"], ".3f"), _fmt(row["tokens_per_sec"], ",.0f"), _fmt(row["mfu"], ".1%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short_label(run: Run, keys: list[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_override(run.overrides.get(k))}" for k in keys) or run.label


def plot_curves(runs: list[Run], keys: list[str], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (renders with Agg)

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for run in runs:
        if run.curve:
            tokens, losses = zip(*run.curve)
            ax.plot(tokens, losses, marker="o", markersize=3, linestyle="-" if run.finished else "--",
                    label=_short_label(run, keys) + ("" if run.finished else f" ({run.status})"))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_final(runs: list[Run], keys: list[str], metric: str, path: Path) -> None:
    """Final metric of the finished runs against each swept parameter (one panel per key; run names if none)."""
    from matplotlib.figure import Figure

    finished = [r for r in runs if r.finished and _is_number(r.summary.get(metric))]
    panels = keys or [None]
    fig = Figure(figsize=(max(4.5, 3.8 * len(panels)), 4), layout="constrained")
    for i, key in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        values = [r.summary[metric] for r in finished]
        xs = [r.overrides.get(key) if key else r.label for r in finished]
        numeric = key is not None and all(_parse_float(x) is not None for x in xs)
        if numeric:
            points = sorted(zip((_parse_float(x) for x in xs), values))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        else:
            labels = [str(x) if x is not None else "—" for x in xs]
            ax.plot(range(len(values)), values, "o", markersize=8)  # points, not bars: the axis does not start at 0
            ax.set_xticks(range(len(values)), labels, rotation=30 if len(labels) > 4 else 0, fontsize=8)
            ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_xlabel(key or "run")
        ax.set_ylabel(f"final {METRICS[metric]}")
        ax.set_title("finished runs" if i == 1 else "")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def _parse_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_report(paths: list[str | Path], out: str | Path, fmt: str = "md", metric: str = "val_loss") -> dict[str, Any]:
    """Write report.md, val_loss.png, final_<metric>.png (and report.csv/.json for ``fmt``) into ``out``.

    Returns {"table": the markdown table, "runs": [Run], "best": Run or None, "files": [written paths]}.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r} is not known; known: {', '.join(FORMATS)}")
    if metric not in METRICS:
        raise ConfigError(f"--metric={metric!r} is not known; known: {', '.join(METRICS)}")
    runs = load_runs(paths)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out={str(out)!r} cannot be created: {exc.strerror or exc}") from exc
    keys = differing_overrides(runs)
    curves, final = out / "val_loss.png", out / f"final_{metric}.png"
    plot_curves(runs, keys, curves)
    plot_final(runs, keys, metric, final)

    table = markdown_table(runs, metric)
    best = best_run(runs, metric)
    unfinished = [r for r in runs if not r.finished]
    lines = [
        "# Run comparison", "",
        f"{len(runs)} runs" + (f", {len(unfinished)} not finished" if unfinished else "")
        + (f"; best {METRICS[metric]}: **{best.label}** ({best.summary[metric]:.4f})" if best else "") + ".", "",
        table, "",
        *fairness_notes(runs), "",
        f"![val loss against tokens seen]({curves.name})", "",
        f"![final {METRICS[metric]} against the swept parameters]({final.name})", "",
        "Runs:", *[f"- `{r.label}`: {r.path}" + (f" ({r.status}: {r.error})" if r.error else "") for r in runs], "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    files = [out / "report.md", curves, final]
    rows = table_rows(runs, metric)
    if fmt == "csv":
        files.append(out / "report.csv")
        with open(files[-1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        files.append(out / "report.json")
        finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]
        files[-1].write_text(json.dumps({"metric": metric, "swept": keys, "runs": finite}, indent=2) + "\n")
    return {"table": table, "runs": runs, "best": best, "files": files}
