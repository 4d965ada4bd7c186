"""Resuming a run from the command line: ``olm-train resume=auto hydra.run.dir=X [overrides]``.

``resume=allow`` does the same where X holds a run and starts one there where it holds none (job scripts
that are started and restarted alike); ``resume=auto`` on a path that holds no run is refused in one line.

The resumed job is composed from X's own overrides (Hydra's record in ``X/.hydra``, or the latest resume's), with
the new overrides on top, so that ``resume=auto hydra.run.dir=X`` alone continues X exactly as it was configured.
New overrides may change how the run continues (``trainer.max_steps=60``, the logger, ``optim.lr``, speed options),
never what it trains: a change of the model or the data is refused with one line naming the keys, before anything is
written. Each resume keeps Hydra's record of itself in ``X/.hydra/resume-<step>/`` (the step it continues from);
X's first record stays as it was.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from olm.errors import ConfigError

log = logging.getLogger("olm")

# Data keys that change how the data is read, not which tokens are trained on.
DATA_KEYS_FREE_ON_RESUME = {"num_workers", "pin_memory", "cache_dir"}
HYDRA_RECORD = ".hydra"


@dataclass
class ResumePlan:
    run_dir: Path
    overrides: list[str]  # the job's overrides: X's own, then the new ones
    record_subdir: str  # where Hydra keeps this resume's record, relative to the run dir
    finished_note: str | None = None  # set when there is nothing left to train


def _key(override: str) -> str:
    return re.split(r"=", override.lstrip("+~"), maxsplit=1)[0]


def resume_mode(overrides: list[str]) -> str | None:
    """The command line's ``resume=`` value (auto, allow), or None."""
    values = [o.split("=", 1)[1] for o in overrides if _key(o) == "resume"]
    return values[-1] if values and values[-1] in ("auto", "allow") else None


def given_run_dir(overrides: list[str]) -> Path | None:
    dirs = [o.split("=", 1)[1] for o in overrides if _key(o) == "hydra.run.dir"]
    return Path(dirs[-1]) if dirs else None


def requested_run_dir(overrides: list[str]) -> Path | None:
    """X when the overrides ask for ``resume=auto`` (or ``allow``) in ``hydra.run.dir=X``."""
    return given_run_dir(overrides) if resume_mode(overrides) else None


FINISHED_MARK = "finished"  # written into a resume's record when the resumed run finishes


def latest_record(run_dir: Path) -> Path | None:
    """The Hydra record (a ``.hydra`` dir) of the latest job that finished in ``run_dir``: the latest finished
    resume's, else the first run's. A resume that failed or was stopped is not remembered (repeat its overrides)."""
    base = run_dir / HYDRA_RECORD
    resumes = sorted((p for p in base.glob("resume-*") if p.name[7:].isdigit()), key=lambda p: int(p.name[7:]))
    finished = [p for p in resumes if (p / FINISHED_MARK).is_file() and (p / "overrides.yaml").is_file()]
    for candidate in [*reversed(finished), base]:
        if (candidate / "overrides.yaml").is_file():
            return candidate
    return None


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """``saved`` with ``new`` on top: one override per key, the newest winning."""
    merged: dict[str, str] = {}
    for override in [*saved, *new]:
        merged.pop(_key(override), None)
        merged[_key(override)] = override
    return list(merged.values())


def on_restart(overrides: list[str]) -> list[str]:
    """``overrides`` with ``resume=auto`` when this is a restarted SLURM job or torchrun worker (olm.train.slurm)
    on a ``hydra.run.dir`` that holds a checkpoint: it continues its own run, composed from that run's overrides."""
    from olm.train.slurm import restart

    run_dir = requested_run_dir([*overrides, "resume=auto"])
    if restart() is None or run_dir is None or any(_key(o) in ("resume", "ckpt_path") for o in overrides):
        return overrides
    if checkpoint_step(run_dir) is None:
        return overrides
    return [*overrides, "resume=auto"]


def plan(overrides: list[str], compose) -> ResumePlan | None:
    """The resumed job for ``overrides``, or None when they do not resume an existing run (a fresh run, or
    ``resume=allow`` on a run dir without a checkpoint). ``resume=auto`` where there is no run is refused: a mistyped
    path never trains a new run. ``compose(overrides)`` composes a config as olm-train would."""
    mode = resume_mode(overrides)
    run_dir = requested_run_dir(overrides)
    if mode is None or (run_dir is None and mode == "allow"):
        return None
    if run_dir is None:
        raise no_run_to_resume(None)
    record = latest_record(run_dir)
    saved_config = run_dir / "config.yaml"
    if record is None or not saved_config.is_file():
        if mode == "allow":
            return None
        raise no_run_to_resume(run_dir)
    if checkpoint_step(run_dir) is None:
        if mode == "allow":
            return None  # it stopped before its first checkpoint: started again, as a restarted job is
        raise nothing_to_resume(run_dir)
    own = [o for o in OmegaConf.load(record / "overrides.yaml") if _key(str(o)) not in ("resume", "ckpt_path")]
    new = [o for o in overrides if _key(o) not in ("resume", "hydra.run.dir")]
    saved = OmegaConf.load(saved_config)
    # The run keeps its name (W&B continues the same run), whatever the new overrides add to it.
    quoted = str(saved.name).replace("\\", "\\\\").replace("'", "\\'")
    merged = merge_overrides([str(o) for o in own], [*new, f"name='{quoted}'"])
    cfg = compose(merged)
    refuse_changes(saved, cfg, new, lambda dropped: compose([o for o in merged if o != dropped]))
    return ResumePlan(run_dir, merged, f"{HYDRA_RECORD}/resume-{checkpoint_step(run_dir)}",
                      finished_note=_finished(run_dir, cfg))


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint a resume of ``run_dir`` continues from (None without one). It names the resume's
    record, the same on every rank of a job that torchrun or SLURM starts."""
    from olm.checkpoint import latest_checkpoint
    from olm.checkpoint import load_checkpoint

    latest = latest_checkpoint(run_dir)
    return int(load_checkpoint(latest, mmap=True).get("global_step") or 0) if latest else None


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def changed_keys(saved: Any, current: Any, prefix: str) -> list[str]:
    """The dotted keys (under ``prefix``) of every leaf where two plain configs differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += changed_keys(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [prefix]


def leaf(config: dict, key: str) -> Any:
    """The value at a dotted key of a plain config whose first part is the config's own name (``model.embed_dim``)."""
    for part in key.split(".")[1:]:
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _what_it_trains(saved: DictConfig, cfg: DictConfig) -> list[str]:
    """The model, data and optimizer-kind keys where ``cfg`` differs from the run's saved config (an optimizer's
    state does not carry over to another kind; its settings may change)."""
    model = changed_keys(_plain(saved.model), _plain(cfg.model), "model")
    data = [k for k in changed_keys(_plain(saved.data), _plain(cfg.data), "data")
            if k.split(".")[1] not in DATA_KEYS_FREE_ON_RESUME]
    optim = ["optim.name"] if _at(saved, "optim.name") != _at(cfg, "optim.name") else []
    return model + data + optim


def refuse_changes(saved: DictConfig, cfg: DictConfig, new: list[str], compose_without) -> None:
    """A resumed run trains the same model on the same data: anything else is a new run. The refusal names the
    overrides responsible (those without which the change goes away; ``compose_without(o)`` composes the job
    without ``o``), else the changed keys (e.g. a preset that changed since the run)."""
    changed = _what_it_trains(saved, cfg)
    if not changed:
        return
    blamed = [o for o in new if _what_it_trains(saved, compose_without(o)) != changed]
    what = ", ".join(blamed) if blamed else ", ".join(changed[:4])
    shown = "; ".join(f"{k}: {_at(saved, k)!r} -> {_at(cfg, k)!r}" for k in changed[:3])
    raise ConfigError(f"resume: {what} would change what the run trains ({shown}); a resumed run keeps its model, "
                      "data and optimizer: start a new run for that, or drop the override")


def _at(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return _plain(value)


def _finished(run_dir: Path, cfg: DictConfig) -> str | None:
    """A note when the run already trained to the resumed job's ``trainer.max_steps``."""
    from olm.train.outcome import read_summary

    record = read_summary(run_dir)
    steps = record.get("steps")
    if record.get("status") == "finished" and isinstance(steps, int) and steps >= cfg.trainer.max_steps:
        return (f"{run_dir} finished at step {steps} (trainer.max_steps={cfg.trainer.max_steps}); nothing to resume. "
                f"To train it further: olm-train resume=auto hydra.run.dir={run_dir} trainer.max_steps=<more steps>")
    return None


# -- the rules of a run dir: what a job may start or continue there ---------------------------------------------
def has_record(run_dir: Path) -> bool:
    """Whether a run has already left its record in ``run_dir``."""
    return any((run_dir / name).exists() for name in ("metrics.csv", "summary.json", "config.yaml"))


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint this run continues from, or None for a fresh start."""
    from olm.checkpoint import latest_checkpoint

    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={str(path)!r} does not exist")
        return str(path)
    latest = latest_checkpoint(run_dir)
    if cfg.resume is None:
        from olm.train.slurm import restart

        if restart() and latest is not None:  # a requeued SLURM job, a torchrun restart: it goes on
            check_own_run(run_dir, cfg)
            log.info("%s: a restarted job continues its own run from %s", restart(), latest)
            return str(latest)
        refuse_fresh_start(run_dir)
        return None
    if latest is None and cfg.resume == "allow":
        log.info("resume=allow: no checkpoint in %s yet, starting the run there", run_dir)
        return None
    if latest is None and has_record(run_dir):
        raise nothing_to_resume(run_dir)
    if latest is None:
        raise no_run_to_resume(run_dir)
    return str(latest)


def refuse_fresh_start(run_dir: Path) -> None:
    """A fresh run never starts over a run dir holding a run a fresh start would destroy: a checkpoint, or a
    finished run's summary."""
    from olm.checkpoint import latest_checkpoint
    from olm.train.outcome import read_summary

    if latest_checkpoint(run_dir) is not None or read_summary(run_dir).get("status") == "finished":
        raise ConfigError(f"{run_dir} already holds a run (checkpoints, summary.json); continue it with "
                          "resume=auto, or start a new run in another hydra.run.dir")


def no_run_to_resume(run_dir: Path | None) -> ConfigError:
    if run_dir is None:
        return ConfigError("resume=auto continues the run in hydra.run.dir: give hydra.run.dir=<its run dir> "
                           "(resume=allow starts it there when it holds no run yet)")
    return ConfigError(f"resume=auto: {run_dir} holds no run (no config.yaml, no checkpoint); check the path, or "
                       "use resume=allow to start a run there if it holds none")


def nothing_to_resume(run_dir: Path) -> ConfigError:
    return ConfigError(f"resume=auto: {run_dir} holds no checkpoint (the run stopped before its first one, "
                       "written at each validation); nothing to resume, start a new run")


def check_own_run(run_dir: Path, cfg: DictConfig) -> None:
    """A restarted job continues only the run its run dir holds: one line naming the keys where the job's
    config differs from the run's saved ``config.yaml`` (a preset edited while the job waited in the queue, a
    run dir given to two jobs), before anything is written."""
    from olm.train.slurm import SAME_ON_RESTART, restart

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file)
    changed = []
    for key in SAME_ON_RESTART:
        plain = [OmegaConf.to_container(c[key], resolve=True) if isinstance(c[key], DictConfig) else c[key]
                 for c in (saved, cfg)]
        changed += [k for k in changed_keys(*plain, key)
                    if not (key == "data" and k.split(".")[1] in DATA_KEYS_FREE_ON_RESUME)]
    if changed:
        shown = "; ".join(f"{k}: {OmegaConf.select(saved, k)!r} -> {OmegaConf.select(cfg, k)!r}"
                          for k in changed[:3])
        raise ConfigError(f"{restart()}: {run_dir} holds a checkpoint of another config ({shown}); a "
                          "restarted job continues only its own run: give this job another hydra.sweep.dir "
                          "or hydra.run.dir")
