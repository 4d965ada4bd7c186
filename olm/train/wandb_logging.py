"""W&B through Lightning's WandbLogger: offline unless an API key is present, and never fatal to a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from olm.errors import ConfigError, first_line
from olm.train.config import LoggerConfig

log = logging.getLogger("olm")
GIVE_UP_AFTER = 3  # failed W&B calls in a row that mean W&B itself is gone


PROBE_S = 3.0  # how long olm waits for W&B's server to answer before a run starts (W&B itself waits ~90 s)
ENV_MODES = ("online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    """``logger.mode``: auto is W&B's own WANDB_MODE when set, else online when WANDB_API_KEY is set, else
    offline; an explicit online or offline is the config's."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "")
        if env in ENV_MODES:
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def _server() -> tuple[str, int]:
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def has_credentials(host: str) -> bool:
    """A W&B API key: WANDB_API_KEY, or the ~/.netrc entry ``wandb login`` writes."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def unreachable(host: str, port: int) -> str | None:
    """Why W&B's server cannot be reached within PROBE_S seconds (None when it answers)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=PROBE_S).close()
    except OSError as exc:
        return first_line(exc) or type(exc).__name__
    return None


def check_online(cfg: LoggerConfig) -> None:
    """``logger.mode=online`` (or WANDB_MODE=online) is honoured or refused before the run dir exists: W&B's key and
    server are there, or one line says which is missing (W&B would wait about 90 s, then log offline)."""
    asked = cfg.mode == "online" or (cfg.mode == "auto" and _asked_online())
    if cfg.name != "wandb" or not asked:
        return
    host, port = _server()
    which = "logger.mode=online" if cfg.mode == "online" else "WANDB_MODE=online"
    if not has_credentials(host):
        raise ConfigError(f"{which} needs a W&B API key (WANDB_API_KEY, or `wandb login`); none is set for {host}: "
                          "set one, or use logger.mode=offline (and `wandb sync` later)")
    reason = unreachable(host, port)
    if reason is not None:
        raise ConfigError(f"{which}: W&B's server {host}:{port} cannot be reached ({reason}, waited {PROBE_S:g} s); "
                          "use logger.mode=offline (and `wandb sync` later) where there is no network")


def _asked_online() -> bool:
    return os.environ.get("WANDB_MODE") == "online"


def _safe_logger_class():
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class SafeWandbLogger(WandbLogger):
        """A WandbLogger whose failures mid-run (service gone, disk full, network) never stop training: a failed
        call loses that call's row only and is counted; W&B is turned off after ``GIVE_UP_AFTER`` failures in a
        row (a dead service). metrics.csv and summary.json keep the full record either way, and the run's log says
        how many calls W&B missed."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Lightning always passes `anonymous` to wandb.init, which then warns that the setting has no effect.
            self._wandb_init.pop("anonymous", None)
            self.failed_calls = 0
            self._failures_in_a_row = 0

        def _guard(self, what: str, fn, *args, **kwargs):
            if self._failures_in_a_row >= GIVE_UP_AFTER:
                self.failed_calls += 1
                return None
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # logging must never kill a training run
                self.failed_calls += 1
                self._failures_in_a_row += 1
                if self.failed_calls == 1:
                    log.warning("W&B %s failed (%s); that row is missing from W&B, metrics.csv and summary.json "
                                "have it", what, first_line(exc))
                if self._failures_in_a_row == GIVE_UP_AFTER:
                    log.warning("W&B failed %d times in a row; W&B logging is off for the rest of this run",
                                GIVE_UP_AFTER)
                return None
            self._failures_in_a_row = 0
            return result

        def log_hyperparams(self, params) -> None:
            self._guard("log_hyperparams", super().log_hyperparams, params)

        def log_metrics(self, metrics, step=None) -> None:
            self._guard("log", self._log_at_step, metrics, step)

        @rank_zero_only
        def _log_at_step(self, metrics, step) -> None:
            # W&B's own step (_step) is the trainer's step, so a resumed run continues its history where the
            # checkpoint left it instead of counting again from 0 (offline runs cannot ask the server where it was).
            if step is None:
                return super().log_metrics(metrics, step)
            self.experiment.log({**metrics, "trainer/global_step": step}, step=int(step))

        def after_save_checkpoint(self, checkpoint_callback) -> None:
            self._guard("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

        def finalize(self, status: str) -> None:
            self._guard("finalize", super().finalize, status)
            if self.failed_calls:
                log.warning("W&B missed %d logging calls of this run; metrics.csv and summary.json have every row",
                            self.failed_calls)

        def update_summary(self, values: dict) -> None:
            self._guard("summary update", lambda: self.experiment.summary.update(values))

    return SafeWandbLogger


def finish_wandb() -> None:
    """``wandb.finish()`` that never raises (one W&B run per job, also after failures)."""
    try:
        import wandb

        wandb.finish()
    except Exception as exc:  # logging must never kill a training run, nor hide its real error
        log.warning("W&B finish failed (%s); the offline files in the run dir may be incomplete", first_line(exc))


def make_wandb_logger(cfg: LoggerConfig, name: str, run_dir: Path, resume_run_id: str | None = None):
    """A WandbLogger writing into ``run_dir/wandb``; a failing W&B falls back to offline, then to none, and says so.

    ``resume_run_id`` (stored in checkpoints) continues the same W&B run after a resume.
    """
    WandbLogger = _safe_logger_class()
    mode = resolve_mode(cfg.mode)
    if mode == "online" and cfg.mode == "auto" and not _asked_online():  # online only because a key is set
        reason = unreachable(*_server())
        if reason is not None:
            log.warning("W&B's server cannot be reached (%s, waited %g s); logging offline to %s", reason, PROBE_S,
                        run_dir / "wandb")
            mode = "offline"
    kwargs = dict(
        save_dir=str(run_dir),
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group or _sweep_group(),
        tags=list(cfg.tags),
        job_type=_fit_64(cfg.job_type),
        name=name,
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
            log.warning("W&B (%s) could not start: %s", attempt, first_line(exc))
            try:
                import wandb

                wandb.finish()  # a half-started run must not be picked up by the next attempt
            except Exception:
                pass
    log.warning("W&B disabled for this run; metrics.csv and summary.json are still written")
    return None


def _fit_64(text: str | None) -> str | None:
    """W&B keeps at most 64 characters of a job type: a longer variant name keeps its start and a hash of the rest,
    so that two variants never share one."""
    if text is None or len(text) <= 64:
        return text
    import hashlib

    return f"{text[:55]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


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
