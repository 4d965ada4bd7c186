"""Evaluating an olm model on lm-eval tasks, offline: task names resolved with did-you-mean, data checked before any
model runs, results as flat ``<task>/<metric>`` numbers and one printed line per task.

Task names are looked up among olm's shipped tasks first (``olm_next_line``, ``olm_identifier``, the group
``olm``), then in lm-eval's own registry and any ``include_path`` folders of task YAMLs. Hugging Face's offline
switches are set before lm-eval or ``datasets`` are imported, so a dataset missing from the local cache is an error
naming the task and where its data should be, never a download.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olm.errors import ConfigError, first_line
from olm.eval.tasks import GROUP, SHIPPED, shipped_tasks_dir

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SHIPPED_NAMES = (*SHIPPED, GROUP)
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def go_offline() -> None:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("lm-eval", "lm_eval", "datasets", "httpx"):  # lm-eval logs each task's build at INFO
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class Tasks:
    """Resolved tasks: the names asked for and lm-eval's task objects, built once (their data loaded)."""

    names: list[str]
    task_dict: dict = field(repr=False)
    manager: Any = field(repr=False)


def _manager(include_paths: list[str], defaults: bool, cache_dir: str | None):
    paths = (str(shipped_tasks_dir(cache_dir)), *include_paths)
    return _index(paths, defaults)


@functools.lru_cache(maxsize=8)
def _index(paths: tuple[str, ...], defaults: bool):
    """lm-eval's task index; its own thousands of YAMLs take seconds to read, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def _missing_data(name: str, config: dict, exc: Exception) -> ConfigError:
    """A one-line error for a task whose data is not on this machine."""
    path = config.get("dataset_path")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if path in FILE_BUILDERS and files:
        listed = [str(f) for v in (files.values() if isinstance(files, dict) else [files])
                  for f in (v if isinstance(v, list) else [v])]
        absent = [f for f in listed if not Path(f).exists()]
        where = f"its data file {absent[0]!r} does not exist" if absent else f"its data files: {first_line(exc)}"
        return ConfigError(f"task {name!r}: {where}")
    if path and not Path(str(path)).exists():
        from datasets import config as datasets_config

        subset = f" (subset {config['dataset_name']!r})" if config.get("dataset_name") else ""
        return ConfigError(
            f"task {name!r} needs the Hugging Face dataset {path!r}{subset} in the local cache "
            f"({datasets_config.HF_DATASETS_CACHE}); it is not there and olm never downloads: load it once "
            "where there is network and copy the cache, or point the task at local files (dataset_path: json)")
    return ConfigError(f"task {name!r}: its data could not be loaded: {first_line(exc)}")


def unknown_task(name: str, known, where: str = "--tasks") -> ConfigError:
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else f"olm's own tasks: {', '.join(SHIPPED_NAMES)}"
    return ConfigError(f"{where}: task {name!r} is not known to lm-eval or olm; {hint}")


def resolve_tasks(names: list[str], include_paths: list[str] | None = None, cache_dir: str | None = None,
                  where: str = "--tasks") -> Tasks:
    """Check the names and load every task's data, before any model is evaluated."""
    go_offline()
    include_paths = [str(Path(p).expanduser()) for p in include_paths or []]
    for path in include_paths:
        if not Path(path).is_dir():
            raise ConfigError(f"--include-path {path!r} is not a folder of task YAMLs")
    if not names:
        raise ConfigError(f"{where} is empty; olm's own tasks: {', '.join(SHIPPED_NAMES)}")
    only_shipped = all(name in SHIPPED_NAMES for name in names) and not include_paths
    manager = _manager(include_paths, defaults=not only_shipped, cache_dir=cache_dir)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise unknown_task(name, known, where)
    task_dict: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:  # one at a time, so that a task whose data is missing is named
        try:
            loaded = manager.load([name])
        except Exception as exc:
            raise _missing_data(name, _config_of(manager, name), exc) from exc
        for part in task_dict:
            task_dict[part].update(loaded.get(part) or {})
    return Tasks(list(names), task_dict, manager)


def _config_of(manager, name: str) -> dict:
    """The task's config as lm-eval indexed it (for naming its data in an error)."""
    entry = manager.task_index.get(name)
    if entry is None:
        return {}
    if entry.cfg:
        return dict(entry.cfg)
    try:
        from lm_eval.utils import load_yaml_config

        return dict(load_yaml_config(str(entry.yaml_path)))
    except Exception:
        return {}


def evaluate(lm, tasks: Tasks, limit: int | None = None, bootstrap_iters: int = 0) -> dict:
    """lm-eval's results dict for ``lm`` on already resolved tasks (zero-shot, no samples logged)."""
    from lm_eval import evaluator

    results = evaluator.evaluate(lm, tasks.task_dict, limit=limit, bootstrap_iters=bootstrap_iters,
                                 log_samples=False, verbosity="ERROR")
    return results or {}


def _metric_name(key: str) -> str | None:
    """``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match_strict-match``; stderr: None."""
    metric, _, filter_name = key.partition(",")
    if not filter_name or metric.endswith("_stderr") or metric in ("alias", "name", "sample_len", "samples"):
        return None
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def flat_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """``{prefix}<task>/<metric>`` -> value, for every numeric metric of every task and group."""
    flat = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            metric = _metric_name(key)
            if metric is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}{task}/{metric}"] = float(value)
    return flat


def summary_lines(results: dict) -> list[str]:
    """One line per task: its metrics with their standard errors and the number of items."""
    lines = []
    for task, values in (results.get("results") or {}).items():
        parts = []
        for key, value in values.items():
            metric = _metric_name(key)
            if metric is None or not isinstance(value, (int, float)):
                continue
            stderr = values.get(key.replace(",", "_stderr,", 1))
            spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            parts.append(f"{metric} {value:.4f}{spread}")
        n = (results.get("n-samples") or {}).get(task, {}).get("effective")
        count = f" (n={n})" if n is not None else ""
        lines.append(f"{task}: {', '.join(parts)}{count}")
    return lines
