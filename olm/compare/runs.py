"""Run dirs as ``olm compare`` reads them: overrides, resolved config, summary and the logged curves.

A run dir is what ``olm-train`` writes (``.hydra/overrides.yaml``, ``config.yaml``, ``metrics.csv``,
``summary.json``); any other directory given is searched for run dirs, so a multirun dir expands to its jobs. Runs
without a ``summary.json`` (killed, crashed) are kept and marked unfinished or failed, a run whose dir a live run
holds (olm.train.lock) is marked running: they are listed in reports and left out of the statistics.
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
from olm.train.lock import is_live

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SKIP_DIRS = {".hydra", "checkpoints", "model", "tokenizer", "wandb", "__pycache__"}
CURVES = ("train/loss", "val/loss")


@dataclass
class Point:
    step: int  # optimizer steps done
    tokens: float | None
    flops: float | None
    value: float


@dataclass
class Run:
    path: Path
    label: str = ""
    status: str = "unfinished"
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # flattened: "data.seed" -> 0
    summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[Point]] = field(default_factory=dict)  # "train/loss", "val/loss"

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed", self.overrides.get("seed"))
        try:
            return int(seed)
        except (TypeError, ValueError):
            return None

    def metric(self, name: str) -> float | None:
        """A final metric of a finished run (None when it did not log it)."""
        value = self.summary.get(name) if self.finished else None
        return float(value) if is_number(value) else None

    def last_logged(self, name: str = "val/loss") -> float | None:
        """The last value of a curve: what an unfinished run had reached."""
        points = self.curves.get(name)
        return points[-1].value if points else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        found.extend(sorted(inside, key=natural_key))
    return list(dict.fromkeys(p.resolve() for p in found))


def natural_key(path: Path | str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _load_yaml(path: Path) -> Any:
    """A run's YAML record as plain Python (None when missing or unreadable); interpolations are left as written.

    PyYAML's C loader (libyaml), the parser under OmegaConf, reads the record only: a run dir's config.yaml is
    already resolved by olm-train, and building a DictConfig of it (OmegaConf.load) takes about 40 ms a file, so
    500 runs would take 40 s instead of 1."""
    try:
        text = path.read_text()
    except (OSError, ValueError):  # missing, or not UTF-8
        return None
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError:  # a half-written or hand-edited file: the run is still listed
        return None


def _parse_overrides(lines: Any) -> dict[str, str]:
    overrides = {}
    for line in lines if isinstance(lines, list) else []:
        key, sep, value = str(line).partition("=")
        if sep:
            overrides[key.lstrip("+~")] = value
    return overrides


def _parse_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_curves(path: Path, flops_per_token: float | None = None,
                tokens_per_step: float | None = None) -> dict[str, list[Point]]:
    """The train and val loss of every logged row of metrics.csv, each with its step, tokens and FLOPs seen.

    Validation rows carry no tokens: they come from the train row of the same step, else from the tokens per step
    of the last train row, else ``tokens_per_step`` (a run pruned before its first train row); FLOPs likewise, else
    tokens x ``flops_per_token`` (runs logged before flops_seen)."""
    try:
        with open(path, newline="") as f:
            rows = [{k: _parse_float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, csv.Error, ValueError):
        return {}
    seen: dict[int, tuple[float | None, float | None]] = {}
    per_step = tokens_per_step
    for row in rows:  # Lightning logs the step before the optimizer step's counter moves: steps done = step + 1
        if row.get("tokens_seen") is not None and row.get("step") is not None:
            step = int(row["step"]) + 1
            seen[step] = (row["tokens_seen"], row.get("flops_seen"))
            per_step = row["tokens_seen"] / step
    curves: dict[str, list[Point]] = {name: [] for name in CURVES}
    for row in rows:
        if row.get("step") is None:
            continue
        step = int(row["step"]) + 1
        tokens, flops = seen.get(step, (None, None))
        if tokens is None and per_step:
            tokens = step * per_step
        if flops is None and tokens is not None and flops_per_token:
            flops = tokens * flops_per_token
        for name in CURVES:
            if row.get(name) is not None:
                curves[name].append(Point(step, tokens, flops, row[name]))
    return {name: points for name, points in curves.items() if points}


def load_run(path: Path) -> Run:
    run = Run(path=path)
    run.overrides = _parse_overrides(_load_yaml(path / ".hydra" / "overrides.yaml"))
    config = _load_yaml(path / "config.yaml")  # resolved by olm-train; .hydra/config.yaml may hold interpolations
    if not isinstance(config, dict):
        config = _load_yaml(path / ".hydra" / "config.yaml")
    run.config = _flatten(config) if isinstance(config, dict) else {}
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
    if is_live(path):
        run.status, run.error = "running", None  # a run holds the dir: what it left so far is no result
    tokens, steps = run.summary.get("tokens_seen"), run.summary.get("steps")
    per_step = tokens / steps if is_number(tokens) and is_number(steps) and steps > 0 else None
    run.curves = read_curves(path / "metrics.csv", run.summary.get("flops_per_token"), per_step)
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
