"""The outcome of a run: ``summary.json``, the final lines it prints, and how a failure ends the command.

Exit codes: 0 finished; 2 a mistake in the input (config keys and values, data, checkpoint files); 1 a fault of the
run (NaN/inf loss, a checkpoint that cannot be written, a dead rank, a full disk); 143 (128 + SIGTERM) stopped by
SIGTERM (e.g. a SLURM preemption). Anything else is a bug in olm or below it and keeps its traceback (as does
everything with OLM_FULL_ERROR=1 or HYDRA_FULL_ERROR=1).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from olm.data.compressors import COMPRESSORS
from olm.errors import ConfigError, OlmError, config_error_cause, first_line

# OS errors that are the environment's (full disk, quota, read-only or forbidden paths), not a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
SIGTERM_EXIT = 128 + int(signal.SIGTERM)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically: a reader (olm compare, a sweep) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_summary(run_dir: Path) -> dict:
    """A run dir's summary.json, or {} when there is none (or it cannot be read)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def sigterm_message(run_dir: Path | None) -> str:
    """What a SIGTERM leaves behind: a checkpoint to resume from, or nothing yet."""
    from olm.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir) if run_dir is not None else None
    if latest is None:
        return ("stopped by SIGTERM before the first checkpoint (written at each validation, every "
                "trainer.val_check_interval steps); there is nothing to resume, start the run again")
    return f"stopped by SIGTERM; continue from {latest.name} with: olm-train resume=auto hydra.run.dir={run_dir}"


def is_sigterm(exc: BaseException) -> bool:
    """Whether ``exc`` is Lightning's SIGTERMException; only an imported Lightning can have raised one, so a
    mistake caught before training is answered without importing it."""
    module = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return module is not None and isinstance(exc, module.SIGTERMException)


def one_line_error(exc: BaseException, run_dir: Path | None = None) -> tuple[int, str] | None:
    """(exit code, message) for failures olm reports as ``error: <one line>``, None for bugs (module docstring)."""
    from omegaconf.errors import OmegaConfBaseException

    if is_sigterm(exc):  # a SystemExit: without this the run would end with status 0
        return SIGTERM_EXIT, sigterm_message(run_dir)
    if os.environ.get("OLM_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    if isinstance(exc, ConfigError):
        return 2, first_line(exc)
    if isinstance(exc, OlmError):
        return 1, first_line(exc)
    if isinstance(exc, OmegaConfBaseException):  # e.g. a mandatory value (???) left unset, a bad interpolation
        cause = config_error_cause(exc)
        if cause is not None:  # raised by an olm resolver (olm.vocab_size)
            return 2, first_line(cause)
        key = getattr(exc, "full_key", None)
        text = first_line(exc)
        return 2, f"{key}: {text}" if key and key not in text else text
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        name = f" ({exc.filename})" if exc.filename else ""
        return 1, f"{exc.strerror or first_line(exc)}{name}"
    return None


def report_error(message: str) -> None:
    """``error: <message>`` once on stderr, and the message in the job's log file (Hydra's file handler) only: a
    console handler would print it a second time."""
    import logging

    logger = logging.getLogger("olm")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {message}", file=sys.stderr, flush=True)


def write_failed_summary(run_dir: Path, exc: BaseException) -> None:
    """``summary.json`` saying ``failed`` or ``interrupted``, unless the run dir already holds a summary (a failed
    resume never overwrites the record of the run it continued)."""
    try:
        if not run_dir.is_dir() or (run_dir / "summary.json").exists():
            return
        # Lightning answers Ctrl-C by calling sys.exit(1) in its KeyboardInterrupt handler
        ctrl_c = isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt)
        status = "interrupted" if ctrl_c or is_sigterm(exc) else "failed"
        error = "stopped by SIGTERM" if is_sigterm(exc) else "stopped by SIGINT (Ctrl-C)" if ctrl_c else first_line(exc)
        write_json(run_dir / "summary.json", {"status": status, "error": error})
    except Exception:  # e.g. the disk is full: the error itself still reaches stderr
        return


# What a job writes into a run dir before it trains: Hydra's record and log, then olm's record (olm.train.run).
BEFORE_TRAINING = ("config.yaml", "tokenizer", "metrics.csv", "hparams.yaml", "checkpoints", "wandb")


def is_fresh(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds no run yet (Hydra's record of this job at most): a refusal may remove it again."""
    return not any((run_dir / name).exists() for name in (*BEFORE_TRAINING, "summary.json", "model"))


def forget_refused_run(run_dir: Path) -> None:
    """A fresh job refused before training (a ConfigError) leaves no run dir behind: what it and Hydra wrote there
    goes (Hydra's record and log, olm's record), then the dir if nothing else is in it."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    names = list(BEFORE_TRAINING)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        names += [name for name in (hc.output_subdir, f"{hc.job.name}.log") if name]
    for name in names:
        path = run_dir / name
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # the lock file, if this process still holds it, goes when it is released


def summarize(run_dir: Path, metrics: dict[str, float], *, datamodule, trainer, throughput, checkpoint,
              num_params: int, started: float) -> dict[str, Any]:
    """The finished run's summary.json entries."""
    val_loss = metrics.get("val/loss")
    on_gpu = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
    return {
        "status": "finished",
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "val_bpb": metrics.get("val/bpb"),
        # gzip -9, bz2 -9 and xz -9e on the same text (gzip_bpb, bz2_bpb, xz_bpb).
        **{f"{name}_bpb": value for name, value in (datamodule.compressor_bits_per_byte() or {}).items()},
        "tokenizer": datamodule.tokenizer.identity if datamodule.tokenizer is not None else None,
        "num_parameters": num_params,
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step * throughput.tokens_per_step,
        "flops_per_token": throughput.flops_per_token,
        "train_flops": trainer.global_step * throughput.tokens_per_step * throughput.flops_per_token,
        "tokens_per_sec": throughput.tokens_per_sec,
        "mfu": throughput.mfu,
        "wall_time_s": round(time.time() - started, 2),
        "checkpoint": checkpoint.best_model_path or checkpoint.last_model_path or None,
        "last_checkpoint": checkpoint.last_model_path or None,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "world_size": trainer.world_size,
        "train_loss": _number(metrics.get("train/loss")),
        # Per-source and downstream metrics, under their logged names (val/<source>/loss, eval/<task>/<metric>).
        **{key: _number(value) for key, value in sorted(metrics.items())
           if key.startswith(("val/", "eval/")) and key not in ("val/loss", "val/bpb", "val/ppl")},
    }


def _number(value) -> float | None:
    return float(value) if value is not None else None


def final_lines(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """What the command prints when a run finishes: where it is, its val loss and bits/byte, its speed."""
    val_loss = summary["val_loss"]
    lines = [f"val loss {val_loss:.4f} nats/token" if val_loss is not None else "val loss n/a"]
    if summary["val_bpb"] is not None:
        shown = [f"{label} {summary[f'{key}_bpb']:.3f}" for key, (label, _) in COMPRESSORS.items()
                 if summary.get(f"{key}_bpb") is not None]
        same_text = f" (on the same text: {', '.join(shown)})" if shown else ""
        lines.append(f"val bits/byte {summary['val_bpb']:.3f}{same_text}")
    downstream = {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/") and v is not None}
    if downstream:
        shown = [f"{name} {value:.3f}" for name, value in downstream.items() if not name.endswith("perplexity")]
        lines.append(f"downstream (callbacks.eval): {', '.join(shown)}")
    if summary["tokens_per_sec"]:
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] else ""
        lines.append(f"{summary['tokens_per_sec']:,.0f} tokens/s{mfu}")
    return ["", f"== {run_dir}", *lines]
