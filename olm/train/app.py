"""`olm-train`: the Hydra application that composes conf/train.yaml and trains with Lightning.

Every run directory (Hydra's, under outputs/) ends up holding:
  .hydra/config.yaml (resolved inputs), config.yaml (resolved, with the vocabulary filled in), metrics.csv,
  summary.json, checkpoints/ (last.ckpt + best by val loss), model/ (Block.save export + tokenizer), wandb/.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from olm.registry import ConfigError, OlmError

log = logging.getLogger("olm")
ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def _quiet_lightning() -> None:
    """One copy of each Lightning message (through Hydra's handlers, so app.log has them too), without ads."""
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # olm's datamodule resumes its data from the global step itself (see LMModule.on_load_checkpoint)
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    # a batch skipped by callbacks.nan_guard.skip_batches: olm's own warning names the step
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")


def _precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"paths.output_dir={str(run_dir)!r} is not writable: {exc.strerror or exc}") from exc


def _check(cfg: DictConfig, key: str, ok, allowed: str) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key}={value!r} must be {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _missing_keys(node, prefix: str = ""):
    """Paths of values left ``???`` (without resolving interpolations, which may not be resolvable yet)."""
    from omegaconf import ListConfig

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            yield path
        elif not OmegaConf.is_interpolation(node, key):
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
                yield from _missing_keys(child, path)


def validate_config(cfg: DictConfig) -> None:
    """Checks of the run-level keys that olm-train reads itself, before any data or model work: each failure is a
    one-line ConfigError naming the key and what it may be (model keys are checked by the registry)."""
    missing = list(_missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} must be set (it is ??? in the config); pass it on the command line: {missing[0]}=...")
    _check(cfg, "data.batch_size", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _check(cfg, "data.seq_len", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _check(cfg, "trainer.max_steps", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _check(cfg, "trainer.log_every_n_steps", lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer")
    _check(cfg, "trainer.val_check_interval", lambda v: v is None or (_is_int(v) and v >= 1) or (_is_num(v) and 0 < v <= 1),
           "a positive number of steps (or a fraction in (0, 1])")
    _check(cfg, "seed", _is_int, "an integer")
    _check(cfg, "optim.lr", lambda v: _is_num(v) and v > 0, "a positive number")
    _check(cfg, "optim.weight_decay", lambda v: v is None or (_is_num(v) and v >= 0), "a number >= 0")
    _check(cfg, "optim.eps", lambda v: v is None or (_is_num(v) and v > 0), "a positive number")
    _check(cfg, "optim.betas", lambda v: v is None or (len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)),
           "two numbers in [0, 1), e.g. [0.9, 0.95]")
    _check(cfg, "scheduler.warmup_steps", lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0")
    _check(cfg, "scheduler.min_lr_ratio", lambda v: v is None or (_is_num(v) and 0 <= v <= 1), "a number in [0, 1]")
    _check(cfg, "callbacks.nan_guard.skip_batches", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "callbacks.checkpoint.save_top_k", lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1: keep all)")
    _check(cfg, "sample.max_new_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "sample.temperature", lambda v: _is_num(v) and v >= 0, "a number >= 0 (0: greedy)")


@contextlib.contextmanager
def _data_errors():
    """The data layer reports bad input (missing or empty data.path, token ids >= vocab size, ...) as one-line
    ValueErrors naming the key: olm-train reports them as config errors."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError((str(exc).strip().splitlines() or [type(exc).__name__])[0]) from exc


def _build_datamodule(cfg: DictConfig):
    from olm.data import TextDataModule

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("_target_", None)  # never instantiated from the config: olm builds its own datamodule
    try:
        return TextDataModule(**data_cfg)
    except TypeError as exc:
        raise ConfigError(f"data: {exc}") from exc


def _fill_vocab_and_check(cfg: DictConfig, datamodule) -> None:
    """data.vocab_size comes from the tokenizer; the model must be able to embed every token id."""
    with open_dict(cfg):
        if cfg.data.get("vocab_size") is None:
            cfg.data.vocab_size = datamodule.vocab_size
    model_vocab = cfg.model.get("vocab_size")
    if not isinstance(model_vocab, int):
        raise ConfigError(f"model.vocab_size={model_vocab!r} must be an integer")
    if model_vocab < datamodule.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary ({datamodule.vocab_size}, "
            f"data.tokenizer={cfg.data.get('tokenizer')!r}); use model.vocab_size=${{data.vocab_size}}"
        )
    max_seq_len = cfg.model.get("max_seq_len")
    if isinstance(max_seq_len, int) and cfg.data.seq_len > max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={max_seq_len}")


def _loggers(cfg: DictConfig, run_dir: Path, resume_run_id: str | None, resume_step: int | None):
    from olm.train.csv_logging import RunCSVLogger

    loggers = [RunCSVLogger(str(run_dir), resume_step)]  # -> run_dir/metrics.csv
    wandb_logger = None
    kind = cfg.logger.get("name", "none")
    if kind not in ("wandb", "csv", "none"):
        raise ConfigError(f"logger.name={kind!r} is not known; known: wandb, csv, none")
    if kind == "wandb":
        from olm.train.wandb_logging import make_wandb_logger

        wandb_logger = make_wandb_logger(cfg, run_dir, resume_run_id)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers, wandb_logger


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    from olm.train.callbacks import latest_checkpoint

    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={str(path)!r} does not exist")
        return str(path)
    resume = cfg.get("resume")
    if resume in (None, False, "none"):
        return None
    if resume != "auto":
        raise ConfigError(f"resume={resume!r} is not known; use resume=auto or ckpt_path=PATH")
    latest = latest_checkpoint(run_dir)
    if latest is None:
        log.info("resume=auto: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")
    return str(latest) if latest else None


def _read_checkpoint_meta(path: str | None) -> dict:
    """The olm entries of a checkpoint (W&B run id, ...) plus its global step; validates the file early."""
    if not path:
        return {}
    from olm.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return {**state.get("olm", {}), "global_step": state.get("global_step")}


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns ``cfg.optimized_metric`` for sweepers."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from olm.train.callbacks import AtomicModelCheckpoint, ThroughputMonitor, progress_bars
    from olm.train.module import LMModule
    from olm.train.strategies import HydraJobLauncher, RankFailure, cleanup_after_job, rank_failure, resolve_strategy

    started = time.time()
    _quiet_lightning()
    validate_config(cfg)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul on GPUs that have it
    run_dir = Path(cfg.paths.output_dir)
    _check_writable(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    with _data_errors():
        datamodule = _build_datamodule(cfg)
        datamodule.prepare_data()
        _fill_vocab_and_check(cfg, datamodule)
        datamodule.setup("fit")  # token ids < vocab size, enough tokens per split: checked at load, not as a CUDA assert
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_steps = int(trainer_cfg.pop("max_steps"))
    log_every = int(trainer_cfg.get("log_every_n_steps", 10))
    module = LMModule(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.optim, resolve=True),
        OmegaConf.to_container(cfg.scheduler, resolve=True),
        max_steps=max_steps,
        log_every_n_steps=log_every,
        compile=bool(cfg.compile),
        bytes_per_token=datamodule.val_bytes_per_token,
        activation_checkpointing=bool(cfg.activation_checkpointing),
        skip_nonfinite_batches=int(cfg.callbacks.nan_guard.skip_batches),
        fused_loss=cfg.get("fused_loss", "auto"),
        attention_backend=cfg.get("attention_backend", "auto"),
        compile_mode=cfg.get("compile_mode", "default"),
        compile_scope=cfg.get("compile_scope", "model"),
        compile_options=OmegaConf.to_container(cfg.compile_options, resolve=True) if cfg.get("compile_options") else None,
        float8=cfg.get("float8", False),
        float8_head=cfg.get("float8_head", False),
    )
    num_params = module.model.num_parameters()
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    ckpt_path = _resume_path(cfg, run_dir)
    meta = _read_checkpoint_meta(ckpt_path)
    loggers, wandb_logger = _loggers(cfg, run_dir, meta.get("wandb_run_id"), meta.get("global_step"))
    if wandb_logger is not None:
        module.wandb_run_id = wandb_logger.version
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "num_parameters": num_params})

    throughput = ThroughputMonitor(cfg.data.seq_len, cfg.data.batch_size, log_every)
    checkpoint = AtomicModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:06d}-val{val_loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=int(cfg.callbacks.checkpoint.save_top_k),
        save_last=bool(cfg.callbacks.checkpoint.save_last),
    )
    trainer_cfg["precision"] = _precision(trainer_cfg.get("precision", "auto"))
    interval, batches = trainer_cfg.get("val_check_interval"), max_steps * int(trainer_cfg.get("accumulate_grad_batches") or 1)
    if ckpt_path is None and isinstance(interval, int) and interval > batches:
        # Lightning refuses an interval longer than the run; a short run (a smoke test) validates at its end.
        log.info("trainer.val_check_interval=%d > the run's %d batches: validating at the end", interval, batches)
        trainer_cfg["val_check_interval"] = batches

    trainer_cfg = resolve_strategy(trainer_cfg)
    trainer, failed = None, True
    try:
        try:
            trainer = L.Trainer(
                **trainer_cfg,
                max_steps=max_steps,
                logger=loggers,
                callbacks=[throughput, checkpoint, *progress_bars(trainer_cfg.get("enable_progress_bar"))],
                default_root_dir=str(run_dir),
                use_distributed_sampler=False,  # the datamodule shards windows itself (disjoint, resumable)
                num_sanity_val_steps=0,
            )
        except (TypeError, ValueError, MisconfigurationException) as exc:
            raise ConfigError(f"trainer: {str(exc).splitlines()[0]}") from exc
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, HydraJobLauncher):  # a dead child rank that rank 0 never notices: still recorded
            launcher.on_failure = lambda message: _write_failed_summary(cfg, RankFailure(message))

        log.info("model: %s parameters; run dir: %s", f"{num_params:,}", run_dir)
        # weights_only: a checkpoint is tensors and plain containers; never unpickle arbitrary objects from a file.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        module.check_finite()  # steps after the last log step: never export or report diverged weights
        if trainer.global_step % int(trainer_cfg.get("val_check_interval") or 1) or "val/loss" not in trainer.callback_metrics:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        summary = None
        if trainer.is_global_zero:
            summary = _finish_run(cfg, run_dir, module, datamodule, trainer, throughput, checkpoint, metrics, num_params, started)
        if wandb_logger is not None and summary is not None:
            wandb_logger.update_summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        failed = False
    except BaseException as exc:
        explained = rank_failure(trainer, exc)  # a dead or silent peer rank: say which, in one line
        if explained is not None:
            raise explained from exc
        raise
    finally:
        if wandb_logger is not None:
            from olm.train.wandb_logging import finish_wandb

            finish_wandb()  # one W&B run per job, also in sweeps and after failures
        cleanup_after_job(trainer, failed=failed)
    return metrics.get(cfg.get("optimized_metric") or "val/loss")


def _finish_run(cfg, run_dir, module, datamodule, trainer, throughput, checkpoint, metrics, num_params, started):
    from olm.generate import generate

    val_loss = metrics.get("val/loss")
    summary: dict[str, Any] = {
        "status": "finished",
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "val_bpb": metrics.get("val/bpb"),
        "gzip_bpb": datamodule.gzip_bits_per_byte(),
        "num_parameters": num_params,
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step * throughput.tokens_per_step,
        "tokens_per_sec": throughput.tokens_per_sec,
        "mfu": throughput.mfu,
        "wall_time_s": round(time.time() - started, 2),
        "checkpoint": checkpoint.best_model_path or checkpoint.last_model_path or None,
        "last_checkpoint": checkpoint.last_model_path or None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda" else "cpu",
        "world_size": trainer.world_size,
    }
    if cfg.get("export", True):
        export_dir = module.model.save(run_dir / "model")
        if datamodule.tokenizer is not None:
            datamodule.tokenizer.save(export_dir / "tokenizer")
        summary["model_dir"] = str(export_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"val loss {val_loss:.4f} nats/token" if val_loss is not None else "val loss n/a"]
    if summary["val_bpb"] is not None:
        lines.append(f"val bits/byte {summary['val_bpb']:.3f} (gzip -9 on the same text: {summary['gzip_bpb']:.3f})")
    if summary["tokens_per_sec"]:
        lines.append(f"{summary['tokens_per_sec']:,.0f} tokens/s" + (f", MFU {summary['mfu']:.1%}" if summary["mfu"] else ""))
    print("\n".join(["", f"== {run_dir}", *lines]), flush=True)
    tokenizer = datamodule.tokenizer
    if tokenizer is not None and cfg.sample.max_new_tokens > 0:
        prompt = torch.tensor(tokenizer.encode(cfg.sample.prompt), device=module.device)
        out = generate(
            module.model, prompt, cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
            top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, seed=cfg.seed,
        )
        print(f"-- sample (prompt {cfg.sample.prompt!r}):\n{tokenizer.decode(out[0].tolist())}\n--", flush=True)
    return summary


# OS errors that are the environment's (full disk, quota, read-only or forbidden paths), not a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def one_line_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for failures olm reports as ``error: <one line>``, None for everything else.

    Exit 2: a mistake in the input (config keys and values, data, checkpoint files). Exit 1: a fault of the run
    (NaN/inf loss, a checkpoint that cannot be written, a dead rank, a full disk). Exit 143 (128 + SIGTERM): the run
    was stopped by SIGTERM (e.g. a SLURM preemption; Lightning stops all ranks at the same step). Anything else is a
    bug in olm or below it and keeps its traceback (as does everything with OLM_FULL_ERROR=1 or HYDRA_FULL_ERROR=1).
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf.errors import OmegaConfBaseException

    def first(text: str) -> str:
        return (text.strip().splitlines() or [type(exc).__name__])[0]

    if isinstance(exc, SIGTERMException):  # a SystemExit: without this the run would end with status 0
        return 128 + int(signal.SIGTERM), "stopped by SIGTERM before max_steps; resume=auto continues from the last checkpoint"
    if os.environ.get("OLM_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    if isinstance(exc, ConfigError):
        return 2, first(str(exc))
    if isinstance(exc, OlmError):
        return 1, first(str(exc))
    if isinstance(exc, OmegaConfBaseException):  # e.g. a mandatory value (???) left unset, a bad interpolation
        key = getattr(exc, "full_key", None)
        text = first(str(exc))
        return 2, f"{key}: {text}" if key and key not in text else text
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        name = f" ({exc.filename})" if exc.filename else ""
        return 1, f"{exc.strerror or first(str(exc))}{name}"
    return None


def run_job(cfg: DictConfig) -> float | None:
    """``train(cfg)`` as the command line runs it: input mistakes and run faults end as one ``error: ...`` line on
    stderr and a non-zero exit, with ``summary.json`` saying ``failed``; bugs keep their traceback."""
    try:
        return train(cfg)
    except BaseException as exc:
        _write_failed_summary(cfg, exc)  # a crash or Ctrl-C too: the run dir says so (`olm compare` lists it)
        reported = one_line_error(exc)
        if reported is None:
            raise
        code, message = reported
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def _write_failed_summary(cfg: DictConfig, exc: BaseException) -> None:
    try:
        run_dir = Path(cfg.paths.output_dir)
        if not run_dir.is_dir() or (run_dir / "summary.json").exists():
            return
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SIGTERMException)) else "failed"
        error = "stopped by SIGTERM" if isinstance(exc, SIGTERMException) else (str(exc).splitlines() or [type(exc).__name__])[0]
        (run_dir / "summary.json").write_text(json.dumps({"status": status, "error": error}, indent=2) + "\n")
    except Exception:  # e.g. the disk is full: the error itself still reaches stderr
        return


def compose_run_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """Compose conf/train.yaml with command-line ``overrides`` as Hydra would; Hydra's multi-line composition
    errors become one-line ConfigErrors naming the override, with the known options or keys."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from olm.train.schema import register_configs

    register_configs()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)
    except OverrideParseException as exc:
        raise ConfigError(_parse_error(overrides, exc)) from None
    except MissingConfigException as exc:
        raise ConfigError(_missing_option(overrides, exc)) from None
    except ConfigCompositionException as exc:
        raise ConfigError(_composition_error(overrides, exc)) from None


def _known(value: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.5)
    return (f"; did you mean {close[0]!r}?" if close else ";") + f" known: {', '.join(valid)}"


def _parse_error(overrides: list[str], exc: Exception) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as one:
            return f"cannot parse the override {override!r}: {str(one).strip().splitlines()[0]}"
    return f"cannot parse the overrides: {str(exc).strip().splitlines()[0]}"


def _missing_option(overrides: list[str], exc) -> str:
    missing = str(getattr(exc, "missing_cfg_file", "") or "")
    group, _, value = missing.rpartition("/")
    options = sorted(o for o in (getattr(exc, "options", None) or []) if not o.startswith("schema_"))
    if not group or not options:
        return str(exc).strip().splitlines()[0]
    return f"{group}={value} is not a known option of {group!r}" + _known(value, options)


def _composition_error(overrides: list[str], exc: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    text = str(exc).strip().splitlines()[0]
    if cause is None:
        if text.startswith("Ambiguous value"):
            return text + " (a sweep needs -m; a list is key=[a,b]; a string with commas is quoted: key='a,b')"
        return text
    full_key = getattr(cause, "full_key", None) or ""
    reason = str(cause).strip().splitlines()[0]
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key:
        parent, _, key = full_key.rpartition(".")
        others = [o for o in overrides if not o.lstrip("+~").startswith(full_key)]
        try:
            base = compose_run_config(others)
            node = OmegaConf.select(base, parent) if parent else base
            keys = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
        except Exception:
            keys = []
        where = f"of {parent!r}" if parent else "at the top level"
        known = _known(key, keys).replace("known:", f"known keys {where}:") if keys else ""
        return f"{full_key} is not a config key{known} (to add a new key: +{full_key}=...)"
    value = getattr(cause, "value", None)
    shown = f"={value!r}" if value is not None else ""
    return f"{full_key}{shown}: {reason}" if full_key else f"{text}: {reason}"


# What Hydra may instantiate from a config (launcher, sweeper, sampler, callbacks: ``_target_``; logging handlers:
# ``class``/``()``): Hydra's own classes, its plugins, Optuna's samplers and the logging module. Anything else would
# let a config file run arbitrary code; olm's own code is imported only through the explicit ``model.imports`` list.
SAFE_TARGETS = ("hydra.", "hydra_plugins.", "logging.", "optuna.samplers.", "optuna.pruners.")


def _unsafe_targets(node, path: str = "hydra"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("_target_", "class", "()") and isinstance(value, str) and not value.startswith(SAFE_TARGETS):
                yield f"{path}.{key}", value
            yield from _unsafe_targets(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _unsafe_targets(value, f"{path}[{i}]")


def check_hydra_targets(cfg: DictConfig) -> None:
    """Refuse a composed config (with its ``hydra`` node) that would make Hydra instantiate a class or callable
    outside SAFE_TARGETS: one-line ConfigError naming the key."""
    hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False) if "hydra" in cfg else {}
    for key, target in _unsafe_targets(hydra_node):
        raise ConfigError(
            f"{key}={target!r} is not allowed: a config may only make Hydra instantiate {', '.join(SAFE_TARGETS)}* "
            "(import your own components with model.imports=[...])"
        )


def _precheck_command_line(argv: list[str]) -> None:
    """Compose the command line once before Hydra does.

    - single runs: an unknown preset, option or key, a type error or a malformed override is one line
      (``error: ...``, exit 2) instead of Hydra's multi-line report;
    - every run, sweeps too: what Hydra would instantiate from the config is checked against SAFE_TARGETS.
    DDP child ranks (``--config-path``: rank 0's checked config) and anything this cannot compose are left to Hydra.
    """
    if any(arg.startswith(("--config-path", "--config-dir", "-cp", "--config-name", "-cn")) for arg in argv):
        return
    flags = [a for a in argv if a.startswith("-")]
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags)
    if multirun:  # sweep values (a=1,2) cannot be composed: check the rest
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except Exception:
            return
        overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        cfg = compose_run_config(overrides, return_hydra_config=True)
        check_hydra_targets(cfg)
    except ConfigError as exc:
        if multirun and "is not allowed" not in str(exc):
            return  # Hydra reports composition errors of sweeps itself
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception:  # anything else: Hydra itself reports it as usual
        return


def main() -> None:
    from olm.train.schema import register_configs

    register_configs()
    _precheck_command_line(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
