"""W&B through Lightning's WandbLogger: offline unless an API key is present, and never fatal to a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from olm.registry import ConfigError

log = logging.getLogger("olm")
MODES = ("auto", "online", "offline")


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r} is not known; known: {', '.join(MODES)}")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def make_wandb_logger(cfg: DictConfig, run_dir: Path, resume_run_id: str | None = None):
    """A WandbLogger writing into ``run_dir/wandb``; a failing W&B falls back to offline, then to none, and says so.

    ``resume_run_id`` (stored in checkpoints) continues the same W&B run after a resume.
    """
    from lightning.pytorch.loggers import WandbLogger

    lc = cfg.logger
    mode = resolve_mode(lc.get("mode", "auto"))
    kwargs = dict(
        save_dir=str(run_dir),
        project=lc.get("project") or "olm",
        entity=lc.get("entity"),
        group=lc.get("group") or _sweep_group(),
        tags=list(lc.get("tags") or []),
        job_type=lc.get("job_type"),
        name=_job_name(cfg.get("name")),
    )
    if resume_run_id:
        kwargs.update(id=resume_run_id, resume="allow")
    for attempt in [mode] + (["offline"] if mode == "online" else []):
        try:
            import wandb

            logger = WandbLogger(mode=attempt, settings=wandb.Settings(silent=True, console="off"), **kwargs)
            _ = logger.experiment  # start the run now, so a failure shows here and not mid-training
            if attempt != mode:
                log.warning("W&B %s failed; logging offline to %s instead", mode, run_dir / "wandb")
            return logger
        except Exception as exc:  # W&B must never kill a training run
            log.warning("W&B (%s) could not start: %s", attempt, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    log.warning("W&B disabled for this run; metrics.csv and summary.json are still written")
    return None


def _multirun_job():
    """Hydra's config of this job when it is one job of a multirun (-m), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def _sweep_group() -> str | None:
    """Jobs of one multirun share a W&B group unless logger.group is set: the sweep dir's name (<date>_<time>)."""
    hc = _multirun_job()
    return Path(hc.runtime.output_dir).parent.name if hc else None


def _job_name(name: str | None) -> str | None:
    """A multirun job's W&B name gets its overrides appended, unless it holds them already (experiments' names do)."""
    hc = _multirun_job()
    overrides = hc.job.override_dirname if hc else ""
    if overrides and overrides not in (name or ""):
        return f"{name}/{overrides}" if name else overrides
    return name
